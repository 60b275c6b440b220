"""Per-model token prices.

Operators write prices the way vendors publish them: a decimal string of asset units per million
tokens (``output_per_mtok = "0.60"``). They are converted once, exactly, to integer atomic units
per million tokens; a price finer than one atomic unit per million tokens is refused rather than
rounded. The cost of a request is then::

    charge(input, output) = round_up(input * input_per_mtok + output * output_per_mtok, 1_000_000)

computed on the request's running totals, so the increments the meter debits while streaming
always add up to exactly the rounded total (see :func:`meters.money.round_up`).
"""

from __future__ import annotations

from dataclasses import dataclass

from meters.errors import ConfigError, InvalidAmount
from meters.money import Asset, round_up

MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Rate:
    """Prices of one model in atomic units per million tokens."""

    input_per_mtok: int
    output_per_mtok: int

    @classmethod
    def parse(cls, asset: Asset, *, input_per_mtok: str, output_per_mtok: str,
              where: str = "rate") -> Rate:
        """Build a rate from decimal strings; ``where`` names the config key in errors."""
        try:
            rin = asset.parse(input_per_mtok, field=f"{where}.input_per_mtok")
            rout = asset.parse(output_per_mtok, field=f"{where}.output_per_mtok")
        except InvalidAmount as exc:
            raise ConfigError(exc.message, param=exc.param) from exc
        return cls(input_per_mtok=rin, output_per_mtok=rout)

    def charge(self, input_tokens: int, output_tokens: int) -> int:
        """What a request with these token counts costs, in atomic units (rounded up once)."""
        return round_up(input_tokens * self.input_per_mtok
                        + output_tokens * self.output_per_mtok, MTOK)

    def affordable_output(self, input_tokens: int, output_tokens: int, budget: int) -> int:
        """How many more output tokens fit in ``budget`` atomic units on top of what is charged
        for ``(input_tokens, output_tokens)`` already."""
        if self.output_per_mtok == 0:
            return 1 << 62  # free output: unbounded
        base = self.charge(input_tokens, output_tokens)
        # Largest n with charge(in, out + n) <= base + budget:
        #   in*ri + (out+n)*ro <= (base+budget) * MTOK
        limit = (base + budget) * MTOK - input_tokens * self.input_per_mtok
        n = limit // self.output_per_mtok - output_tokens
        return max(n, 0)
