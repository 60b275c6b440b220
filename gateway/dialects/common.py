"""Helpers shared by the dialects: the tolerant wire model base, the prompt estimate, and
token-exact truncation.

The request models validate only what the gateway reads to meter and route (the model name,
``stream``, the output limit, the shape of messages and content blocks) and accept every other
field, role and block type as they come: the body is forwarded untouched, so a request the model
API accepts is never refused here. Strict types (no ``"true"`` for ``true``), because the APIs
refuse those too.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from gateway.errors import BadRequest
from meters.tokens import TokenCounter, media_tokens

#: A metered text field inside a parsed event: (the object holding it, its key).
FieldRef = tuple[dict[str, Any], str]

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


class Wire(BaseModel):
    """Base of request models: strict about the fields declared, tolerant of everything else."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


def bad(param: str, message: str) -> BadRequest:
    """A 400 naming the offending field."""
    return BadRequest(message, param=param)


def bearer_headers(api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "text/event-stream, application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


# -- reading upstream JSON defensively (an upstream is foreign input too) ----------------------

def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is an object, else an empty one."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` if it is an array, else an empty one."""
    return value if isinstance(value, list) else []


def text_of(value: Any) -> list[str]:
    """The text a response content value holds (a string, or parts with ``text``)."""
    if isinstance(value, str):
        return [value]
    return [part["text"] for part in as_list(value)
            if isinstance(part, dict) and isinstance(part.get("text"), str)]


# -- the prompt estimate ------------------------------------------------------------------------

#: Block types that are pictures (a flat cost, see meters.tokens.media_tokens).
IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
#: Block types carrying other media (documents, files, audio): cost by inline size.
MEDIA_TYPES = frozenset({"document", "file", "input_file", "input_audio", "audio",
                         "container_upload"})
#: Keys whose values are identifiers, flags or opaque data, not text the model reads.
_SKIP = frozenset({"type", "id", "role", "call_id", "tool_call_id", "tool_use_id",
                   "cache_control", "signature", "encrypted_content", "status", "media_type",
                   "detail", "format", "file_id", "citations", "is_error"})


class PromptEstimate:
    """Collects the text of a prompt and the token cost of its non-text blocks.

    The walk is generic on purpose: any string the model will read counts (a new block type
    costs its text, never zero), images and other media cost their documented flat amount.
    """

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.media_tokens = 0

    @property
    def text(self) -> str:
        return "\n".join(self.texts)

    def add(self, value: Any) -> None:
        if isinstance(value, str):
            if value:
                self.texts.append(value)
        elif isinstance(value, list):
            for item in value:
                self.add(item)
        elif isinstance(value, dict):
            kind = value.get("type")
            if not isinstance(kind, str):  # a list or object is no block type (nor hashable)
                kind = None
            if kind in IMAGE_TYPES:
                self.media_tokens += media_tokens("image")
            elif kind in MEDIA_TYPES and not _is_text_document(value):
                self.media_tokens += media_tokens("media", _inline_bytes(value))
            else:
                for key, item in value.items():
                    if key not in _SKIP:
                        self.add(item)
        elif value is not None and not isinstance(value, bool):
            self.texts.append(str(value))  # numbers in tool inputs are tokens too


def _is_text_document(block: dict[str, Any]) -> bool:
    """An Anthropic document whose source is plain text or content blocks: count its text."""
    source = block.get("source")
    return isinstance(source, dict) and source.get("type") in ("text", "content")


def _inline_bytes(block: Any) -> int:
    """Approximate decoded size of the base64 data inside a media block (0 if referenced)."""
    longest = 0
    stack = [block]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and len(value) > longest:
            longest = len(value)
    return longest * 3 // 4


# -- truncation -----------------------------------------------------------------------------------

def split_fields(fields: list[FieldRef], keep_tokens: int, counter: TokenCounter) -> int:
    """Shorten the text fields in place so that together they add at most ``keep_tokens``
    tokens to the stream ``counter`` counts (the fields were measured but not committed).

    Returns the tokens actually kept: a cut falls on a token boundary, so it may keep fewer
    than asked, and only what is kept is delivered and billed.
    """
    remaining = keep_tokens
    for container, key in fields:
        text = container[key]
        count = counter.measure([text])
        if count > remaining:
            text = container[key] = counter.split(text, remaining)
            count = counter.measure([text])
        counter.commit([text])
        remaining -= count
    return keep_tokens - remaining
