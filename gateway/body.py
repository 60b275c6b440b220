"""Request bodies: read as JSON whatever the content type says, validate with typed models.

Every route reads its body here, so a body that is too large, empty, not JSON or not the
expected shape gets the same answers everywhere: 413 ``request_too_large``, 400
``invalid_json`` with ``param: "body"`` (also for nesting deeper than :data:`MAX_DEPTH`), or
400 ``invalid_request`` naming the first offending field the way the APIs do
(``messages[1].content``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.errors import BadRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)

#: Deepest nesting of arrays and objects accepted in a body. The body is forwarded upstream
#: re-encoded (orjson encodes at most 255 levels) and walked by the prompt estimate; no model
#: API request comes near this.
MAX_DEPTH = 128


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 over ``limit`` bytes, 400 if it is not JSON.

    The content type is not checked: clients (curl's ``-d``, some SDKs) label JSON bodies
    ``application/x-www-form-urlencoded`` or nothing at all, and the model APIs accept them.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes",
                              param="body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes",
                                  param="body")
    if not body:
        raise BadRequest("the request body is empty; send a JSON object", code="invalid_json",
                         param="body")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.args[0][:120]}",
                         code="invalid_json", param="body") from exc
    if too_deep(value, MAX_DEPTH):
        raise BadRequest(f"the request body is nested more than {MAX_DEPTH} levels deep",
                         code="invalid_json", param="body")
    return value


def too_deep(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels (iterative: a
    deep value must not exhaust the stack here either)."""
    if not isinstance(value, dict | list):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 1, "content")`` -> ``"messages[1].content"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


_TYPE_TAGS = frozenset({"str", "int", "bool", "float", "none", "dict", "list"})


def _is_tag(part: int | str) -> bool:
    """Location parts pydantic adds for union members and validators, not fields: type names
    (``str``, ``list[Block]``, ``Block``) and ``function-after[...]``. API field names are
    lower-case and never contain brackets."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part[:1].isupper())


def validation_error(exc: ValidationError, *, prefix: tuple[int | str, ...] = ()
                     ) -> BadRequest:
    """A 400 naming the deepest field pydantic refused.

    A value that fits no member of a union (``content`` neither a string nor a list) yields
    one error per member at the same place: they are merged into one message.
    """
    errors = exc.errors(include_url=False)
    located = [(tuple(p for p in e["loc"] if not _is_tag(p)), e) for e in errors]
    deepest = max(len(loc) for loc, _ in located)
    loc, first = next((loc, e) for loc, e in located if len(loc) == deepest)
    same = [e for other, e in located if other == loc]
    if len(same) > 1:
        wants = [e["msg"].removeprefix("Input should be ") for e in same
                 if e["msg"].startswith("Input should be ")]
        message = ("should be " + ", or ".join(dict.fromkeys(wants)) if len(wants) == len(same)
                   else first["msg"])
    else:
        message = first["msg"].removeprefix("Value error, ")
    param = field_path(prefix + loc)
    return BadRequest(f"{param}: {message}", param=param)


def parse(model: type[M], data: Any) -> M:
    """Validate ``data`` into ``model``; a 400 naming the field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc
