"""The pooled HTTP client that talks to model APIs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from gateway.errors import BadRequest, RateLimited, UpstreamError
from gateway.settings import Settings

_NEVER_FORWARD = frozenset({"authorization", "x-api-key", "cookie", "payment-signature",
                            "x-payment", "host", "content-length"})

#: Upstream error bodies are read for their message, never more than this.
MAX_ERROR_BODY = 64 * 1024


class Upstreams:
    """One pooled ``httpx.AsyncClient`` for all upstreams of the process."""

    def __init__(self, settings: Settings, *, max_connections: int = 4096) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=512),
            timeout=httpx.Timeout(120.0, connect=5.0),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def forwarded(self, upstream: str, headers: Mapping[str, str]) -> dict[str, str]:
        """The client headers this upstream is configured to receive."""
        prefixes = tuple(self.settings.upstreams[upstream].forward_headers)
        if not prefixes:
            return {}
        return {name: value for name, value in headers.items()
                if name.lower().startswith(prefixes) and name.lower() not in _NEVER_FORWARD}

    def url(self, upstream: str, path: str) -> str:
        return self.settings.upstreams[upstream].base_url.rstrip("/") + path

    async def open(self, upstream: str, path: str, body: Mapping[str, Any],
                   headers: Mapping[str, str]) -> httpx.Response:
        """Send a request and return the response with its body not yet read.

        The caller owns the response and must ``aclose()`` it: closing it mid-stream closes the
        connection, which is how the model is told to stop generating.
        """
        cfg = self.settings.upstreams[upstream]
        request = self.client.build_request(
            "POST", self.url(upstream, path), content=orjson.dumps(body), headers=dict(headers),
            timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"upstream {upstream!r} timed out",
                                code="upstream_timeout") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {upstream!r} is unreachable",
                                code="upstream_unreachable") from exc
        if response.status_code >= 400:
            await _raise_for_status(upstream, response)
        return response


async def _raise_for_status(upstream: str, response: httpx.Response) -> None:
    raw = b""
    try:
        async for chunk in response.aiter_bytes():
            raw += chunk
            if len(raw) > MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    message = _error_message(raw) or f"HTTP {response.status_code}"
    status = response.status_code
    if status in (400, 422):
        # The model API rejected a parameter we passed through: that is the client's input.
        raise BadRequest(f"the model API rejected the request: {message}",
                         code="upstream_rejected")
    if status == 429:
        raise RateLimited(f"the model API is rate limiting: {message}")
    raise UpstreamError(f"upstream {upstream!r} answered HTTP {status}: {message}")


def _error_message(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", errors="replace").strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:500]
    if isinstance(error, str):
        return error[:500]
    return ""
