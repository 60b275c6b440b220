"""Helpers shared by the dialects: request field validation and token-exact truncation."""

from __future__ import annotations

from typing import Any, NoReturn

from gateway.errors import BadRequest
from meters.tokens import Tokenizer

#: A metered text field inside a parsed event: (the object holding it, its key).
Field = tuple[dict[str, Any], str]


def bad(param: str, message: str) -> NoReturn:
    """Raise a 400 naming the offending field."""
    raise BadRequest(message, param=param)


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        bad("body", "the request body must be a JSON object")
    return body


def require_string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        bad(key, f"{key} is required and must be a non-empty string")
    return value


def optional_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        bad(key, f"{key} must be true or false")
    return value


def optional_positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        bad(key, f"{key} must be a positive integer")
    return value


def bearer_headers(api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "text/event-stream, application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def split_fields(fields: list[Field], keep_tokens: int, tokenizer: Tokenizer) -> None:
    """Shorten the text fields in place so that together they hold ``keep_tokens`` tokens."""
    remaining = keep_tokens
    for container, key in fields:
        text = container[key]
        count = tokenizer.count(text)
        if count <= remaining:
            remaining -= count
            continue
        container[key] = tokenizer.split(text, remaining)
        remaining = 0
