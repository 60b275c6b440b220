"""Per-model token prices.

Operators write prices the way vendors publish them: a decimal string of asset units per million
tokens (``output_per_mtok = "0.60"``). They are converted once, exactly, to integer atomic units
per million tokens; a price finer than one atomic unit per million tokens is refused rather than
rounded. Prompt tokens come in three price classes: uncached input, cache reads and cache writes
(vendors discount the first and surcharge the second; both default to the input price). The cost
of a request is then::

    charge = round_up(input * input_per_mtok + cache_read * cache_read_per_mtok
                      + cache_write * cache_write_per_mtok + output * output_per_mtok, 1_000_000)

computed on the request's running totals, so the increments the meter debits while streaming
always add up to exactly the rounded total (see :func:`meters.money.round_up`).
"""

from __future__ import annotations

from dataclasses import dataclass

from meters.errors import ConfigError, InvalidAmount
from meters.money import Asset, round_up

MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt's tokens by price class: uncached ``input``, ``cache_read``, ``cache_write``."""

    input: int = 0
    cache_read: int = 0
    cache_write: int = 0

    @property
    def total(self) -> int:
        return self.input + self.cache_read + self.cache_write


@dataclass(frozen=True, slots=True)
class Rate:
    """Prices of one model in atomic units per million tokens (cache prices: None = input's)."""

    input_per_mtok: int
    output_per_mtok: int
    cache_read_per_mtok: int | None = None
    cache_write_per_mtok: int | None = None

    @classmethod
    def parse(cls, asset: Asset, *, input_per_mtok: str, output_per_mtok: str,
              cache_read_per_mtok: str | None = None, cache_write_per_mtok: str | None = None,
              where: str = "rate") -> Rate:
        """Build a rate from decimal strings; ``where`` names the config key in errors."""
        try:
            rin = asset.parse(input_per_mtok, field=f"{where}.input_per_mtok")
            rout = asset.parse(output_per_mtok, field=f"{where}.output_per_mtok")
            read = (None if cache_read_per_mtok is None else
                    asset.parse(cache_read_per_mtok, field=f"{where}.cache_read_per_mtok"))
            write = (None if cache_write_per_mtok is None else
                     asset.parse(cache_write_per_mtok, field=f"{where}.cache_write_per_mtok"))
        except InvalidAmount as exc:
            raise ConfigError(exc.message, param=exc.param) from exc
        return cls(input_per_mtok=rin, output_per_mtok=rout, cache_read_per_mtok=read,
                   cache_write_per_mtok=write)

    def converted(self, numerator: int, denominator: int) -> Rate:
        """The same prices in another unit: each price times ``numerator / denominator``,
        rounded up (:func:`~meters.money.round_up`) to a whole atomic unit per million tokens
        of the other unit. A fiat price derived from a USDC one: ``10**(2 + 6)`` cents per
        ``10**(6 + 6)`` USDC atomic units at one dollar per USDC."""
        def each(price: int | None) -> int | None:
            return None if price is None else round_up(price * numerator, denominator)
        converted_in, converted_out = each(self.input_per_mtok), each(self.output_per_mtok)
        assert converted_in is not None and converted_out is not None
        return Rate(input_per_mtok=converted_in, output_per_mtok=converted_out,
                    cache_read_per_mtok=each(self.cache_read_per_mtok),
                    cache_write_per_mtok=each(self.cache_write_per_mtok))

    def prompt_cost(self, prompt: Prompt | int) -> int:
        """The prompt's exact cost, in atomic units times one million (not yet rounded)."""
        if isinstance(prompt, int):
            return prompt * self.input_per_mtok
        read = self.input_per_mtok if self.cache_read_per_mtok is None \
            else self.cache_read_per_mtok
        write = self.input_per_mtok if self.cache_write_per_mtok is None \
            else self.cache_write_per_mtok
        return (prompt.input * self.input_per_mtok + prompt.cache_read * read
                + prompt.cache_write * write)

    def charge(self, prompt: Prompt | int, output_tokens: int) -> int:
        """What a request with this prompt and output costs, in atomic units (rounded up
        once). ``prompt`` may be a plain count of uncached input tokens."""
        return round_up(self.prompt_cost(prompt) + output_tokens * self.output_per_mtok, MTOK)

    def affordable_output(self, prompt: Prompt | int, output_tokens: int, budget: int) -> int:
        """How many more output tokens fit in ``budget`` atomic units on top of what is charged
        for ``(prompt, output_tokens)`` already."""
        if self.output_per_mtok == 0:
            return 1 << 62  # free output: unbounded
        base = self.charge(prompt, output_tokens)
        # Largest n with charge(prompt, out + n) <= base + budget:
        #   prompt_cost + (out+n)*ro <= (base+budget) * MTOK
        limit = (base + budget) * MTOK - self.prompt_cost(prompt)
        n = limit // self.output_per_mtok - output_tokens
        return max(n, 0)
