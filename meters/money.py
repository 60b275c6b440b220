"""Money as integers.

Every amount inside tollstream is an ``int`` in the asset's atomic units (USDC has 6 decimals, so
``1_000_000`` is one dollar). Decimal strings exist only at the edges (configuration, admin API,
payment headers) and are converted here, exactly, never through ``float``.

The one rounding rule, :func:`round_up`, is used wherever a price is not a whole number of atomic
units: **a request's charge is its exact cost rounded up to the next atomic unit, once per
request** (see :mod:`meters.rates`). Rounding up means the operator never gives away a fraction
of an atomic unit; rounding once per request (not per token) keeps the overcharge below one atomic
unit per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meters.errors import InvalidAmount

_DECIMAL = re.compile(r"^(0|[1-9][0-9]*)(?:\.([0-9]+))?$")
_INTEGER = re.compile(r"^(0|[1-9][0-9]*)$")

#: Upper bound on any single amount: well beyond any real balance, small enough that Redis'
#: Lua numbers (IEEE doubles) still represent every sum exactly (2**53).
MAX_AMOUNT = 2**52


@dataclass(frozen=True, slots=True)
class Asset:
    """The unit balances are kept in."""

    symbol: str = "USDC"
    decimals: int = 6

    def parse(self, text: str, *, field: str = "amount") -> int:
        """Parse a decimal string of whole asset units (``"1.25"``) into atomic units."""
        return parse_decimal(text, self.decimals, field=field)

    def format(self, atomic: int) -> str:
        """Format atomic units as a decimal string of whole asset units."""
        return format_decimal(atomic, self.decimals)


def round_up(numerator: int, denominator: int) -> int:
    """The rounding rule: ceiling division of non-negative integers."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("round_up takes a non-negative numerator and a positive denominator")
    return -(-numerator // denominator)


def parse_decimal(text: str, decimals: int, *, field: str = "amount") -> int:
    """Exact conversion of a non-negative decimal string to an integer scaled by ``10**decimals``.

    Refuses more fractional digits than ``decimals`` (it would need rounding, and money given
    as input is never rounded silently), signs, exponents, blanks and non-strings.
    """
    if not isinstance(text, str):
        raise InvalidAmount(f"{field} must be a decimal string, got {type(text).__name__}",
                            param=field)
    match = _DECIMAL.match(text)
    if match is None:
        raise InvalidAmount(f"{field} must be a non-negative decimal string like \"1.25\", "
                            f"got {text[:40]!r}", param=field)
    whole, frac = match.group(1), match.group(2) or ""
    if len(frac) > decimals:
        raise InvalidAmount(f"{field} has more than {decimals} decimal places: {text!r}",
                            param=field)
    value = int(whole) * 10**decimals + int(frac.ljust(decimals, "0") or "0")
    if value > MAX_AMOUNT:
        raise InvalidAmount(f"{field} is too large: {text!r}", param=field)
    return value


def parse_atomic(value: object, *, field: str = "amount") -> int:
    """Parse an amount given in atomic units: a string of digits (preferred) or a JSON integer."""
    if isinstance(value, bool):
        raise InvalidAmount(f"{field} must be a string of digits in atomic units", param=field)
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidAmount(f"{field} must be a string of digits in atomic units", param=field)
    if _INTEGER.match(text) is None:
        raise InvalidAmount(f"{field} must be a non-negative whole number of atomic units, "
                            f"got {text[:40]!r}", param=field)
    amount = int(text)
    if amount > MAX_AMOUNT:
        raise InvalidAmount(f"{field} is too large: {text!r}", param=field)
    return amount


def format_decimal(atomic: int, decimals: int) -> str:
    """``1500000, 6 -> "1.5"``; exact, no trailing zeros beyond the first decimal."""
    sign = "-" if atomic < 0 else ""
    whole, frac = divmod(abs(atomic), 10**decimals)
    if decimals == 0:
        return f"{sign}{whole}"
    digits = str(frac).rjust(decimals, "0").rstrip("0")
    return f"{sign}{whole}.{digits or '0'}"


#: Accounts holding a fiat currency are named ``fiat_<currency>_<key>`` (``fiat_usd_...``);
#: every other account holds the gateway's asset. Fiat and the asset are never mixed: an
#: account's balance is in one of them, and its requests are priced in it.
FIAT_PREFIX = "fiat_"


def fiat_account(currency: str, key: str) -> str:
    """The id of a fiat account (``currency`` as ISO 4217 lowercase letters)."""
    return f"{FIAT_PREFIX}{currency.lower()}_{key}"


def account_currency(account_id: str) -> str | None:
    """The fiat currency an account holds (``"usd"``), None for the gateway's asset."""
    if not account_id.startswith(FIAT_PREFIX):
        return None
    currency, _, rest = account_id[len(FIAT_PREFIX):].partition("_")
    return currency if currency.isalpha() and rest else None

