"""Hypothesis strategies for the fuzz suite (tests/test_fuzz.py).

Everything a client can send the gateway: bodies of every kind (empty, not JSON, JSON of every
type, deep nesting, huge strings), request bodies shaped like each dialect's and then mutated
(wrong types, unknown roles and block types, nulls, odd numbers, media blocks, tool calls), the
headers the gateway and its rails parse (``Authorization``, ``x-api-key``, ``anthropic-version``,
``anthropic-beta``, ``content-type``, the rate limiter's client header; the x402 payment headers
are built in the test module, next to the dev chain they are signed for), admin bodies, unknown
paths and wrong methods.

The strategies favour pools of hand-made values (one choice each) over drawing every character:
a case costs about a millisecond to generate, so the suite runs 10,000+ cases in CI time, while
the mutations and a share of fully random leaves keep the variety.

Bodies are built as Python values and serialized by :func:`dump`; nesting deeper than the
serializer's recursion allows is a :class:`Deep` leaf that :func:`dump` writes out as text.
"""

from __future__ import annotations

import base64
import functools
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

Headers = list[tuple[str, str | bytes]]


@functools.lru_cache(maxsize=None, typed=True)
def pick(*values: Any) -> st.SearchStrategy[Any]:
    """``st.sampled_from(values)``, made once: composites draw from it on every case, and a
    strategy made afresh each time costs Hypothesis its validation again."""
    return st.sampled_from(values)


# --------------------------------------------------------------------------- JSON values

@dataclass(frozen=True)
class Deep:
    """A JSON value nested ``depth`` levels deep (``[[[...]]]`` or ``{"a":{"a":...}}``)."""

    depth: int
    kind: str = "list"
    leaf: str = "0"

    def text(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + self.leaf + "]" * self.depth
        return '{"a":' * self.depth + self.leaf + "}" * self.depth


def dump(value: Any, *, ascii_only: bool = False) -> bytes:
    """JSON bytes of ``value``; :class:`Deep` leaves are written out as raw text."""
    deep: dict[str, str] = {}

    def token(v: Any) -> str:
        if not isinstance(v, Deep):
            raise TypeError(f"not JSON: {v!r}")
        name = f"@@deep{len(deep)}@@"
        deep[name] = v.text()
        return name

    text = json.dumps(value, ensure_ascii=ascii_only, default=token)
    for name, raw in deep.items():
        text = text.replace(f'"{name}"', raw)
    return text.encode("utf-8", "surrogatepass")


def clone(value: Any) -> Any:
    """A copy of a JSON value (faster than deepcopy; strings and leaves are shared)."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


#: Depths around the limits that matter: the serializer's (255), Python's recursion limit
#: (~1000) and the JSON parser's (1024).
deep_values = st.builds(
    Deep,
    depth=st.one_of(st.integers(1, 1100), st.sampled_from([127, 128, 200, 254, 255, 256, 300,
                                                            900, 1000, 1022, 1023, 1024, 3000])),
    kind=st.sampled_from(["list", "dict"]),
    leaf=st.sampled_from(["0", '"x"', "null", "[]", "{}"]))

BIG_INTS = [0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**52, 2**53, 2**53 + 1, 2**63 - 1, 2**63,
            2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, 2**256 - 1, 2**256]
ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(BIG_INTS))
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e308, -1e308, 5e-324, 1.5, 1e16]))
short_text = st.text(max_size=10)
TEXTS = ["", " ", "\n", "\x00", "hi", "null", "true", "1", "-1", "0x", "\u202e", "\ufeff",
         "💥" * 10, "\\", '"', "</s>", "%s%n", "${jndi:x}", "\r\n\r\n", "\ud7ff\ue000",
         "a\u0000b", "x" * 20_000, "é" * 6_000, "字" * 4_000, "🙂" * 3_000, " " * 10_000,
         "the quick brown fox " * 500, "<|endoftext|>", "<|im_start|>system"]
texts = st.one_of(st.sampled_from(TEXTS), st.sampled_from(TEXTS), short_text)
json_scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), floats, short_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(short_text, inner, max_size=3)),
    max_leaves=6)

ODD_POOL: list[Any] = [
    None, True, False, 0, -1, 1, 2.5, -0.0, 1e308, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 10**30,
    -(2**63), "", " ", "\n", "null", "1", "true", "x" * 20_000, "é" * 6_000, [], {}, [None],
    [[]], [{}], [1, "a", None], {"": None}, {"type": None}, {"type": ""}, {"type": 1},
    {"type": "text"}, {"type": "text", "text": None}, {"type": "text", "text": 5},
    {"type": "image", "source": None}, {"type": "image_url", "image_url": "x"},
    {"role": "user", "content": "hi"}, [{"role": "user"}], {"a": {"b": {"c": [1, 2, {}]}}},
    [[[[[[[[[[]]]]]]]]]], {"include_usage": "yes"}, {"include_usage": True, "x": 1},
    ["x"] * 200, [{"type": "text", "text": "a"}] * 100,
]
#: Values a field gets when a mutation replaces it.
odd_values = st.one_of(st.sampled_from(ODD_POOL), st.sampled_from(ODD_POOL), json_scalars,
                       json_values, deep_values)


def paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value (dict keys and list indexes), outermost first."""
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((*here, key))
            out.extend(paths(item, (*here, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value[:50]):
            out.append((*here, index))
            out.extend(paths(item, (*here, index)))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any], *, most: int = 3) -> Any:
    """A value of ``base`` with up to ``most`` mutations: a field (often a ``type`` or
    ``role``) replaced by an odd value, deleted, wrapped in a list, turned into a string, or an
    unknown field added."""
    value = clone(draw(base))
    for _ in range(draw(pick(0, 0, 0, 1, 1, 2, most))):
        where = paths(value)
        op = draw(pick("replace", "replace", "replace", "retype", "delete", "add", "wrap",
                       "stringify", "root"))
        if op == "retype":  # what dialects branch on: a block's type, a message's role
            where = [p for p in where if p[-1] in ("type", "role")]
            op = "replace"
        if op == "root" or not where:
            value = clone(draw(odd_values)) if op == "root" else value
            continue
        path = where[draw(st.integers(0, len(where) - 1))]
        parent = value
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if op == "replace":
            parent[last] = clone(draw(odd_values))
        elif op == "delete":
            del parent[last]
        elif op == "wrap":
            parent[last] = [parent[last]]
        elif op == "stringify":
            parent[last] = dump(parent[last]).decode("utf-8", "replace")
        elif isinstance(parent[last], dict):
            parent[last][draw(pick("type", "role", "content", "text", "extra",
                                               "cache_control", "stream", "x"))] = clone(
                draw(odd_values))
        elif isinstance(parent[last], list):
            parent[last].append(clone(draw(odd_values)))
    return value


def with_options(required: dict[str, Any], options: dict[str, list[Any]], *,
                 most: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    """``required`` (strategies) plus up to ``most`` optional fields, each a value from its
    pool (valid and invalid ones mixed)."""
    chosen = st.lists(st.sampled_from(sorted(options)), max_size=most, unique=True)
    values = {key: st.sampled_from(pool) for key, pool in options.items()}

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        body = {key: draw(strategy) for key, strategy in required.items()}
        for key in draw(chosen):
            body[key] = clone(draw(values[key]))
        return body
    return build()


# --------------------------------------------------------------------------- raw bodies

#: Request bodies of every kind, as bytes: empty, blank, not JSON, invalid UTF-8, JSON of
#: every type, deep nesting, huge strings, NaN/Infinity, duplicate keys, trailing garbage.
RAW_POOL = [b"", b" ", b"\n\r\t ", b"\x00", b"\xef\xbb\xbf{}", b"{", b"}", b"[", b"{}", b"[]",
            b"null", b"true", b"0", b'""', b"NaN", b"Infinity", b"-Infinity", b'{"a":NaN}',
            b'{"model":"exact","model":1}', b"{}garbage", b"{} {}", b'{"\\ud800":1}',
            b'"\\ud800"', b"\xff\xfe", b"\xc3\x28", b"1e999999", b"-0", b"1E400",
            b"123456789012345678901234567890", b'{"messages": [}', b"model=exact&messages=hi",
            b"--boundary\r\n\r\n--boundary--", b'{"model": "exact", "messages": "\xff"}',
            b'{"model":"exact","messages":[{"role":"user","content":"hi"}],"max_tokens":1}\x00',
            b" " * 70_000 + b"{}", b'{"model":"' + b"x" * 70_000 + b'"}', b"[" * 100_000]
raw_bodies = st.one_of(
    st.sampled_from(RAW_POOL), st.sampled_from(RAW_POOL),
    st.binary(max_size=200),
    st.text(max_size=50).map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_values.map(dump), json_scalars.map(dump),
    deep_values.map(lambda d: d.text().encode()))


# --------------------------------------------------------------------------- dialect bodies

BOOLS: list[Any] = [True, False, True, False, None, 0, 1, "true", "false", [], {}]
MAX_TOKENS: list[Any] = [1, 2, 3, 5, 16, 64, 4096, 0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**64 - 1,
                         2**64, 10**30, 1.0, 2.5, "5", None, True, [], -(2**63)]
TOOLS: list[Any] = [
    [], [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "description": "x" * 3000}}}}}],
    [{"name": "search", "description": "find", "input_schema": {"type": "object"}}],
    [{"type": "web_search_20250305", "name": "web_search"}], [{"type": "bash_20250124"}],
    [{"type": "custom", "name": "c", "format": {"type": "text"}}], [None], ["f"], [{}],
]
IMAGE_URLS = ["data:image/png;base64,iVBORw0KGgo=", "https://example.invalid/x.png", "data:,",
              "", "data:image/png;base64," + "A" * 4000]

CHAT_MESSAGES: list[Any] = [
    {"role": "user", "content": "hi"},
    {"role": "system", "content": "be brief"},
    {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
    {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                 {"type": "image_url", "image_url": {"url": IMAGE_URLS[0],
                                                                     "detail": "low"}}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URLS[-1]}}]},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "UklGRg==" * 50, "format": "wav"}}]},
    {"role": "user", "content": [{"type": "file", "file": {"file_data": "JVBERi0=" * 40,
                                                           "filename": "a.pdf"}}]},
    {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"q": 1}'}}]},
    {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom",
                                          "custom": {"name": "c", "input": "x"}}]},
    {"role": "assistant", "content": "ok", "tool_calls": []},
    {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "42"}]},
    {"role": "function", "name": "f", "content": "x"},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
    {"role": "robot", "content": "beep"},
    {"role": "user", "content": ""}, {"role": "user", "content": []},
    {"role": "user", "content": "x" * 20_000}, {"role": "user", "content": "é" * 6_000},
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "made_up", "d": [1]}]},
    {"role": "user", "content": [{"type": "text"}]},
    {"role": "user", "content": "hi", "name": "bob", "weird": {"nested": [1, 2, 3]}},
]
CHAT_OPTIONS: dict[str, list[Any]] = {
    "stream": BOOLS,
    "stream_options": [None, {}, {"include_usage": True}, {"include_usage": False},
                       {"include_usage": None}, {"include_usage": "yes"}, [], "x", 1,
                       {"include_usage": True, "continuous_usage_stats": True}],
    "n": [1, 1, 2, 0, -1, None, 1.0, "1", 2**64],
    "max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "tools": TOOLS,
    "tool_choice": ["auto", "none", "required", {}, {"type": "function"}, 1],
    "temperature": [0, 1, 2.5, -1, None, "hot"], "user": ["u", "", None, 1],
    "response_format": [{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}],
    "logprobs": BOOLS, "seed": [0, -1, 2**64], "reasoning_effort": ["low", "x", None],
}


def chat_bodies(models: Sequence[str]) -> st.SearchStrategy[Any]:
    """OpenAI Chat Completions requests, then mutated."""
    message = st.one_of(st.sampled_from(CHAT_MESSAGES), st.sampled_from(CHAT_MESSAGES),
                        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                               "content": texts}))
    return mutated(with_options({"model": st.sampled_from(list(models)),
                                 "messages": st.lists(message, min_size=1, max_size=3)},
                                CHAT_OPTIONS))


SOURCES: list[Any] = [
    {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK" * 200},
    {"type": "url", "url": "https://example.invalid/a.pdf"},
    {"type": "text", "media_type": "text/plain", "data": "plain document text"},
    {"type": "content", "content": [{"type": "text", "text": "inner"}]},
    {"type": "file", "file_id": "file_1"}, {"type": "base64"}, {}, None, "x",
]
ANTHROPIC_BLOCKS: list[Any] = [
    {"type": "text", "text": "hello"},
    {"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}},
    *({"type": "image", "source": s} for s in SOURCES[:3]),
    *({"type": "document", "source": s} for s in SOURCES),
    {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}},
    {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"deep": [[[[1]]]]}},
    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"},
    {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
     "content": [{"type": "text", "text": "boom"}, {"type": "image", "source": SOURCES[0]}]},
    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
    {"type": "redacted_thinking", "data": "opaque"},
    {"type": "search_result", "source": "s", "title": "t",
     "content": [{"type": "text", "text": "r"}]},
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"q": "x"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
    {"type": "container_upload", "file_id": "file_1"}, {"type": "unknown_block", "x": 1},
    {"type": "text"}, {"type": "text", "text": "x" * 20_000},
]


def messages_bodies(models: Sequence[str], *, count_only: bool = False
                    ) -> st.SearchStrategy[Any]:
    """Anthropic Messages (or count_tokens) requests, then mutated."""
    block = st.sampled_from(ANTHROPIC_BLOCKS)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "user", "user", "assistant", "assistant", "system",
                                  "tool", ""]),
         "content": st.one_of(texts, st.lists(block, max_size=3))})
    options: dict[str, list[Any]] = {
        "system": ["be brief", "", [{"type": "text", "text": "sys"}], ANTHROPIC_BLOCKS[:3],
                   None, 1, [None]],
        "stream": BOOLS, "tools": TOOLS, "metadata": [{"user_id": "u"}, None, "x"],
        "thinking": [{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}, "x"],
        "stop_sequences": [[], ["\n"], "x"], "temperature": [0, 1, -1, None],
        "tool_choice": [{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "f"}, "x"],
        "service_tier": ["auto", "standard_only"], "context_management": [{"edits": []}]}
    required: dict[str, Any] = {"model": st.sampled_from(list(models)),
                                "messages": st.lists(message, min_size=1, max_size=3)}
    if count_only:
        options["max_tokens"] = MAX_TOKENS
    else:
        required["max_tokens"] = st.sampled_from(MAX_TOKENS[:7] * 3 + MAX_TOKENS)
    return mutated(with_options(required, options))


RESPONSES_ITEMS: list[Any] = [
    {"role": "user", "content": "hi"}, {"type": "message", "role": "user", "content": "hi"},
    {"role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
    {"role": "user", "content": [{"type": "input_text", "text": "what is this?"},
                                 {"type": "input_image", "image_url": IMAGE_URLS[0]}]},
    {"role": "user", "content": [{"type": "input_file", "file_data": "JVBERi0=" * 40,
                                  "filename": "a.pdf"}]},
    {"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklGRg=="}}]},
    {"role": "assistant", "content": [{"type": "output_text", "text": "ok",
                                       "annotations": []}]},
    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"q": 1}'},
    {"type": "function_call_output", "call_id": "c1", "output": "42"},
    {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text",
                                                                  "text": "42"}]},
    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA" * 50},
    {"type": "item_reference", "id": "msg_1"},
    {"type": "custom_tool_call", "call_id": "c2", "name": "c", "input": "x"},
    {"type": "made_up", "payload": {"a": [1, 2]}}, {"role": "robot", "content": "beep"},
    {"role": "user", "content": ""}, {"role": "user", "content": []}, {},
    {"role": "user", "content": "x" * 20_000},
]
RESPONSES_OPTIONS: dict[str, list[Any]] = {
    "instructions": ["be brief", "", None, "x" * 20_000, 1, []], "stream": BOOLS,
    "max_output_tokens": MAX_TOKENS, "tools": TOOLS,
    "previous_response_id": ["resp_1", "", None, 1],
    "conversation": ["conv_1", "", {"id": "conv_1"}], "prompt": [{"id": "pmpt_1"}, None, ""],
    "store": BOOLS, "reasoning": [{"effort": "low"}, {"summary": "auto"}, "x"],
    "text": [{"format": {"type": "text"}}, None], "truncation": ["auto", "disabled", 1],
}


def responses_bodies(models: Sequence[str]) -> st.SearchStrategy[Any]:
    """OpenAI Responses requests, then mutated."""
    items = st.lists(st.sampled_from(RESPONSES_ITEMS), min_size=1, max_size=3)
    return mutated(with_options({"model": st.sampled_from(list(models)),
                                 "input": st.one_of(texts, items, items)}, RESPONSES_OPTIONS))


# --------------------------------------------------------------------------- headers

#: Bytes a header value may carry through httpx/h11: visible ASCII, inner blanks, obs-text.
_VALUE_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))


def _header_safe(raw: bytes) -> bytes:
    cleaned = bytes(b if b in _VALUE_BYTES or b in b" \t" else 0x41 for b in raw)
    return b"x" + cleaned + b"x"


header_bytes = st.binary(max_size=40).map(_header_safe)
"""A raw header value, non-ASCII bytes included (no CR/LF/NUL, no outer blanks)."""

ascii_values = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ",
                       max_size=30).map(lambda s: s.strip() or "x")
HEADER_POOL: list[str | bytes] = [
    "x", "0", "-1", "null", "a,b,c", "; ;", "=", "\"'", "%00", "\\x00", "a" * 12_000,
    "a" * 100, "Bearer", "Bearer x", "tsk_", "tsk_" + "A" * 43, "é".encode("latin-1"),
    "字".encode(), b"\xff\xfe\xfd", b"\xc3\x28", b"x\x7fx", "x\ty", "true", "[]", "{}"]
header_values: st.SearchStrategy[str | bytes] = st.one_of(
    st.sampled_from(HEADER_POOL), st.sampled_from(HEADER_POOL), ascii_values, header_bytes)

#: Header names that would break the framing httpx does for us; not the gateway's business.
_FRAMING = frozenset({"content-length", "transfer-encoding", "host", "connection", "expect",
                      "upgrade", "te", "trailer", "keep-alive"})
HEADER_NAMES = ["x-api-key", "authorization", "anthropic-version", "anthropic-beta",
                "openai-beta", "x-fwd-test", "x-fwd-", "payment-signature", "x-payment", "cookie",
                "accept", "accept-encoding", "x-forwarded-for", "tollstream-api-key",
                "x-request-id", "range", "if-none-match", "origin", "idempotency-key",
                "x-stainless-retry-count", "content-encoding", "accept-charset"]
header_names = st.one_of(
    st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_NAMES),
    st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=12)
    .filter(lambda name: name not in _FRAMING and not name.startswith("x-sim-")))
extra_headers = st.one_of(st.just([]), st.just([]),
                          st.lists(st.tuples(header_names, header_values), max_size=2))
content_types = st.sampled_from([
    None, None, None, "application/json", "application/json; charset=utf-8",
    "application/json; charset=latin-1", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/octet-stream", "*/*", "application/json;;;",
    "text/event-stream", "application/xml", "x"])


_AUTH_KINDS = st.sampled_from(["bearer"] * 6 + ["x-api-key"] * 2 + [
    "none", "scheme", "garbage", "huge", "bytes", "mangled", "both", "duplicate", "empty"])


def authorization(keys: Sequence[str]) -> st.SearchStrategy[Headers]:
    """Credentials: a real key as Bearer or x-api-key (often), or garbage of every kind."""
    return _authorization(st.sampled_from(list(keys)))


@st.composite
def _authorization(draw: st.DrawFn, keys: st.SearchStrategy[str]) -> Headers:
    kind = draw(_AUTH_KINDS)
    key = draw(keys)
    if kind == "bearer":
        spacing = draw(pick("Bearer ", "bearer ", "BEARER   ", "Bearer\t"))
        return [("authorization", spacing + key)]
    if kind == "x-api-key":
        return [("x-api-key", key)]
    if kind == "none":
        return []
    if kind == "scheme":
        scheme = draw(pick("Basic", "Token", "Digest", "Bearer:", "Bearerx",
                                       "tsk_", "Bearer Bearer"))
        return [("authorization", f"{scheme} {key}")]
    if kind == "garbage":
        name = draw(pick("authorization", "x-api-key"))
        return [(name, draw(header_values))]
    if kind == "huge":
        size = draw(pick(100, 1000, 8000, 12_000))
        return [(draw(pick("authorization", "x-api-key")),
                 draw(pick("Bearer ", "")) + "tsk_" + "A" * size)]
    if kind == "bytes":
        return [(draw(pick("authorization", "x-api-key")),
                 b"Bearer " + draw(header_bytes))]
    if kind == "mangled":
        index = draw(st.integers(0, max(len(key) - 1, 0)))
        char = draw(pick(*"aZ09_-é"))
        return [("authorization", ("Bearer " + key[:index] + char + key[index + 1:]).encode())]
    if kind == "both":
        other = draw(keys)
        return [("authorization", f"Bearer {key}"), ("x-api-key", other)]
    if kind == "duplicate":
        return [("authorization", f"Bearer {draw(ascii_values)}"),
                ("authorization", f"Bearer {key}")]
    return [("authorization", draw(pick("Bearer", "Bearer ,", "x", "Bearer\t-")))]


anthropic_headers = st.lists(st.tuples(
    st.sampled_from(["anthropic-version", "anthropic-beta"]),
    st.one_of(st.sampled_from(["2023-06-01", "2023-01-01", "x", "claude-code-20250219",
                               "interleaved-thinking-2025-05-14,fine-grained-tool-streaming",
                               "a" * 5000, ",", "é".encode("latin-1")]),
              header_values)), max_size=2)

queries = st.one_of(
    st.just(""), st.just(""),
    st.sampled_from(["", "", "", "?beta=true", "?beta=true", "?", "?beta=false", "?beta",
                     "?beta=true&beta=false", "?a=%zz", "?%00=1", "?x=" + "a" * 5000,
                     "?beta=true&stream=true", "?&&&", "?a[b]=c", "?a=%ff%fe", "?=", "?#x",
                     "?a=b%20c", "?key=" + "%41" * 100]),
    st.text(alphabet=string.ascii_letters + string.digits + "=&%-._~+[]", max_size=20)
    .map(lambda s: "?" + s))


# --------------------------------------------------------------------------- paths, methods

SEGMENTS = ["..", ".", "%2e%2e", "%2F", "%00", "%ff", "%", "v1", "admin", "accounts", "messages",
            "count_tokens", "responses", "chat", "completions", "models", "balance", "credit",
            "rotate-key", "metrics", "healthz", "readyz", "docs", "openapi.json", "redoc", ";",
            "@", "a" * 3000, "%u0000", "%c0%ae", "~", "+", "*", "acct_0", "%20"]
_segments = st.one_of(
    st.sampled_from(SEGMENTS), st.sampled_from(SEGMENTS),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=10),
    st.text(min_size=1, max_size=6).map(lambda s: quote(s, safe="")))


@st.composite
def unknown_paths(draw: st.DrawFn) -> str:
    """A path that is (most likely) no route, some close to real ones."""
    prefix = draw(pick("", "/v1", "/v2", "/admin", "/admin/accounts", "/v1/messages",
                       "/v1/chat", "/v1/models", "/v1/responses", "/healthz", "/v1//",
                       "/V1", "/v1/messages/count_tokens"))
    parts = draw(st.lists(_segments, max_size=3))
    path = prefix + "".join("/" + p for p in parts)
    # Never "//" first: httpx would read what follows as a host name.
    return "/" + (path or "/").lstrip("/") + draw(pick("", "", "/", "//", "?x=1"))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
