"""Money parsing and the rounding rule."""

from __future__ import annotations

import pytest

from meters.errors import ConfigError, InvalidAmount
from meters.money import (
    Asset,
    account_currency,
    fiat_account,
    format_decimal,
    parse_atomic,
    parse_decimal,
    round_up,
)
from meters.rates import Rate

USDC = Asset()


@pytest.mark.parametrize(("text", "atomic"), [
    ("0", 0), ("1", 1_000_000), ("0.60", 600_000), ("0.000001", 1), ("12.5", 12_500_000),
])
def test_parse_decimal_is_exact(text: str, atomic: int) -> None:
    assert USDC.parse(text) == atomic
    assert USDC.parse(USDC.format(atomic)) == atomic


@pytest.mark.parametrize("text", ["-1", "1e3", "0.0000001", " 1", "1.", ".5", "", "abc", "01"])
def test_parse_decimal_refuses(text: str) -> None:
    with pytest.raises(InvalidAmount) as info:
        parse_decimal(text, 6, field="price")
    assert info.value.param == "price"
    assert "price" in info.value.message


def test_parse_decimal_refuses_non_strings() -> None:
    with pytest.raises(InvalidAmount):
        parse_decimal(1.5, 6)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["-5", "1.5", "abc", 1.5, True, None, [], "9" * 30])
def test_parse_atomic_refuses(value: object) -> None:
    with pytest.raises(InvalidAmount):
        parse_atomic(value, field="balance")


def test_parse_atomic_accepts_digits_and_ints() -> None:
    assert parse_atomic("123") == 123
    assert parse_atomic(7) == 7


def test_format_decimal() -> None:
    assert format_decimal(1_500_000, 6) == "1.5"
    assert format_decimal(0, 6) == "0.0"
    assert format_decimal(1, 6) == "0.000001"


def test_round_up_is_ceiling() -> None:
    assert round_up(0, 10) == 0
    assert round_up(1, 10) == 1
    assert round_up(10, 10) == 1
    assert round_up(11, 10) == 2
    with pytest.raises(ValueError):
        round_up(-1, 10)


def test_rate_charge_rounds_up_once_per_request() -> None:
    # 0.60 USD per million output tokens = 0.6 atomic units per token.
    rate = Rate.parse(USDC, input_per_mtok="0.15", output_per_mtok="0.60")
    assert rate.charge(0, 1) == 1       # 0.6 rounds up to 1
    assert rate.charge(0, 10) == 6      # exact
    assert rate.charge(0, 11) == 7      # 6.6 rounds up to 7, not 11 x 1
    assert rate.charge(1000, 0) == 150  # 0.15 USD per million: 0.15 atomic per input token
    assert rate.charge(1, 0) == 1       # 0.15 -> 1
    assert rate.charge(1, 10) == 7      # 0.15 + 6 = 6.15 -> 7, one rounding for the request
    # Increments of a growing request add up to the rounded total (the meter relies on it).
    total = 0
    for n in range(1, 200):
        total += rate.charge(1000, n) - rate.charge(1000, n - 1)
    assert total == rate.charge(1000, 199) - rate.charge(1000, 0)


def test_affordable_output_matches_charge() -> None:
    rate = Rate.parse(USDC, input_per_mtok="0.15", output_per_mtok="0.60")
    for budget in range(0, 30):
        n = rate.affordable_output(1000, 5, budget)
        base = rate.charge(1000, 5)
        assert rate.charge(1000, 5 + n) <= base + budget
        assert rate.charge(1000, 5 + n + 1) > base + budget


def test_rate_refuses_sub_atomic_prices() -> None:
    with pytest.raises(ConfigError) as info:
        Rate.parse(USDC, input_per_mtok="0", output_per_mtok="0.0000001", where="models.x")
    assert info.value.param == "models.x.output_per_mtok"


def test_fiat_accounts_are_named_by_their_currency() -> None:
    assert account_currency(fiat_account("USD", "abc")) == "usd"
    assert account_currency("acct_0123") is None and account_currency("x402_ab") is None
    assert account_currency("fiat_usd_") is None and account_currency("fiat_u5d_x") is None


def test_a_rate_converts_to_fiat_rounding_each_price_up() -> None:
    usdc = Rate.parse(Asset(), input_per_mtok="0.075", output_per_mtok="10.00",
                      cache_read_per_mtok="0.01")
    cents = usdc.converted(100 * 10**6, 10**12)  # 1 USD per USDC, 2 decimals against 6
    assert (cents.input_per_mtok, cents.output_per_mtok) == (8, 1000)  # 7.5 -> 8 cents
    assert cents.cache_read_per_mtok == 1 and cents.cache_write_per_mtok is None

