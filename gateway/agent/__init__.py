"""The agent side of tollstream: what runs next to an agent, not in the gateway.

* :mod:`gateway.agent.x402`: an httpx transport that pays x402 deposits by itself (give it to
  the ``openai`` / ``anthropic`` SDK as ``http_client``);
* :mod:`gateway.agent.wallet_proxy`: ``tollstream wallet``, a loopback proxy that pays for an
  unmodified agent (Claude Code, Codex) pointed at it.
"""

from gateway.agent.x402 import (
    API_KEY_HEADER,
    AsyncPayingTransport,
    PayingTransport,
    SpendCapExceeded,
    Wallet,
    async_paying_client,
    paying_client,
)

__all__ = ["API_KEY_HEADER", "AsyncPayingTransport", "PayingTransport", "SpendCapExceeded",
           "Wallet", "async_paying_client", "paying_client"]
