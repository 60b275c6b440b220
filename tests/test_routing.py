"""Model routing (#8 item 3): exact names, patterns per endpoint, prices from the route or the
shipped price table, and what a client sees for each."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dialects import get_dialect
from gateway.errors import BadRequest, NotFound
from gateway.routing import ModelRouter, price_table
from gateway.settings import Settings
from tests.conftest import TEST_MODELS, RunningGateway

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
RECORDED = Path(__file__).parent / "recorded"
ROUTES = [
    {"match": "claude-*", "upstream": "sim", "dialect": "anthropic_messages",
     "tokenizer": "estimate"},
    {"match": "gpt-*", "upstream": "sim", "dialect": "openai_responses"},
    {"match": "gpt-*", "upstream": "sim", "dialect": "openai_chat"},
    {"match": "local-*", "upstream": "sim", "dialect": "openai_chat",
     "input_per_mtok": "0", "output_per_mtok": "1", "upstream_model": "sim-local"},
]


def router(**extra: Any) -> ModelRouter:
    return ModelRouter(Settings.from_mapping({
        "upstreams": {"sim": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": {"exact": TEST_MODELS["exact"]}, "routes": ROUTES, **extra}))


def test_resolution_order_and_prices() -> None:
    r = router(prices={"gpt-6-luna": {"input_per_mtok": "0.20", "output_per_mtok": "0.80"}})
    chat, messages = get_dialect("openai_chat"), get_dialect("anthropic_messages")
    assert r.resolve("exact", chat).rate.output_per_mtok == 1_000_000
    opus = r.resolve("claude-opus-5-5", messages)
    assert (opus.rate.input_per_mtok, opus.rate.output_per_mtok) == (4_000_000, 20_000_000)
    assert (opus.rate.cache_read_per_mtok, opus.rate.cache_write_per_mtok) == (200_000,
                                                                             5_000_000)
    assert opus.upstream_model == "claude-opus-5-5" and opus.tokenizer.name == "estimate"
    # Dated and bracketed variants take the base name's price; the name goes upstream as is.
    dated = r.resolve("claude-opus-5-5-20260915", messages)
    assert dated.rate == opus.rate and dated.upstream_model == "claude-opus-5-5-20260915"
    assert r.resolve("claude-opus-5-5[1m]", messages).rate == opus.rate
    # The configuration overrides the shipped table.
    assert r.resolve("gpt-6-luna", chat).rate.output_per_mtok == 800_000
    # A route with a price of its own bills every name it covers at that price.
    local = r.resolve("local-anything", chat)
    assert local.rate.output_per_mtok == 1_000_000 and local.upstream_model == "sim-local"


def test_unknown_unpriced_and_wrong_endpoint() -> None:
    r = router()
    chat, messages = get_dialect("openai_chat"), get_dialect("anthropic_messages")
    with pytest.raises(NotFound) as missing:
        r.resolve("mistral-large", chat)
    assert missing.value.code == "model_not_found"
    with pytest.raises(NotFound) as unpriced:
        r.resolve("claude-unreleased-9", messages)
    assert unpriced.value.code == "model_not_priced" and unpriced.value.param == "model"
    with pytest.raises(BadRequest) as wrong:
        r.resolve("claude-opus-5-5", chat)
    assert wrong.value.code == "wrong_endpoint" and "anthropic_messages" in wrong.value.message


def test_a_default_route_takes_every_name() -> None:
    r = router(routes=[*ROUTES, {"match": "*", "upstream": "sim", "dialect": "openai_chat",
                                 "input_per_mtok": "1", "output_per_mtok": "2"}])
    assert r.resolve("anything-at-all", get_dialect("openai_chat")).rate.input_per_mtok \
        == 1_000_000


def test_price_table_is_dated_and_parses() -> None:
    checked, table = price_table()
    assert checked and len(checked) == 10  # YYYY-MM-DD
    assert {"claude-opus-5-5", "gpt-6.1-sol"} <= set(table)
    router()  # every entry parses in the default asset


def test_models_listing_shows_what_routes_resolve_to(gateway_factory: Factory) -> None:
    with gateway_factory(models={"exact": TEST_MODELS["exact"]}, routes=ROUTES) as gw:
        data = httpx.get(f"{gw.url}/v1/models", timeout=10).json()["data"]
    listed = {(m["id"], m["tollstream"]["dialect"]): m for m in data}
    assert ("exact", "openai_chat") in listed
    opus = listed[("claude-opus-5-5", "anthropic_messages")]
    assert opus["tollstream"]["route"] == "claude-*"
    assert opus["tollstream"]["output_per_mtok"] == "20.0"
    assert opus["tollstream"]["cache_read_per_mtok"] == "0.2"
    assert ("gpt-6.1-sol", "openai_responses") in listed
    assert ("gpt-6.1-sol", "openai_chat") in listed
    assert listed[("local-*", "openai_chat")]["tollstream"]["route"] == "local-*"


@pytest.mark.parametrize("recording", ["claude_code_2.1.331.json", "codex_cli_0.169.0.json"])
def test_recorded_agent_requests_are_served(gateway_factory: Factory, recording: str) -> None:
    """The request shapes Claude Code and Codex send today (recorded from the real CLIs,
    prose replaced, structure kept) go through, billed at the table's price."""
    recorded = json.loads((RECORDED / recording).read_text())
    with gateway_factory(routes=ROUTES) as gw:
        account, key = gw.create_account(100_000_000)
        headers = {**recorded["headers"], "authorization": f"Bearer {key}",
                   "x-sim-output-tokens": "20"}
        headers.pop("content-length", None)
        url = f"{gw.url}{recorded['path']}"
        if recorded["query"]:
            url += f"?{recorded['query']}"
        with httpx.Client(timeout=30) as http, http.stream(
                "POST", url, json=recorded["body"], headers=headers) as response:
            assert response.status_code == 200, response.read()
            body = b"".join(response.iter_raw())
        assert b"message_stop" in body or b"response.completed" in body
        state = gw.balance(account)
        assert state["held"] == "0" and int(state["spent"]) > 0
