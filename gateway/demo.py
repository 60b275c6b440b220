"""``tollstream demo``: the whole paid loop on one machine, in one command.

It starts the embedded Redis (a temporary data directory), the simulated model, and the
gateway, each on a free loopback port; makes an account with a small balance; then an agent on
the stock ``openai`` SDK streams an answer until the balance runs out. It prints the tokens as
they arrive, the cut with its machine-readable reason, and the final balance.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import openai

from gateway.app import create_app
from gateway.background import serve
from gateway.embedded import EmbeddedRedis
from gateway.settings import Settings
from gateway.simulator import SimConfig
from gateway.simulator import create_app as create_sim
from meters.money import parse_atomic

MODEL = "gpt-4o-mini"


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(*, balance: str = "120", prompt: str = "Tell me a story.") -> int:
    """Run the demo; returns the process exit code."""
    atomic = parse_atomic(balance, field="balance")
    admin_token = secrets.token_urlsafe(16)
    sim_key = secrets.token_urlsafe(16)
    data_dir = Path(tempfile.mkdtemp(prefix="tollstream-demo-"))
    redis = EmbeddedRedis(data_dir)
    redis_url = redis.start()
    try:
        with serve(create_sim(SimConfig(tokens_per_second=40, tokens_per_chunk=2,
                                        default_output_tokens=2000,
                                        api_key=sim_key))) as sim_url:
            raw = Settings.load(None, env={}).model_dump(mode="python")
            raw.update(admin_token=admin_token, data_dir=str(data_dir))
            raw["upstreams"]["sim"].update(base_url=f"{sim_url}/v1", api_key=sim_key)
            settings = Settings.from_mapping(raw)
            with serve(create_app(settings, redis_url)) as url:
                return _agent(url, admin_token, atomic, prompt, settings)
    finally:
        redis.stop()


def _agent(url: str, admin_token: str, balance: int, prompt: str, settings: Settings) -> int:
    asset = settings.asset_obj()
    rate = settings.rate(MODEL)
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin_token}"},
                      timeout=10) as admin:
        account: dict[str, Any] = admin.post("/admin/accounts",
                                             json={"balance": str(balance)}).json()
    _say(f"gateway   {url}   (embedded Redis, simulated model, Valkey AOF in a temp dir)")
    _say(f"account   {account['account_id']}   balance {balance} atomic units "
         f"= {asset.format(balance)} {asset.symbol}")
    _say(f"price     {MODEL}: {asset.format(rate.input_per_mtok)} in / "
         f"{asset.format(rate.output_per_mtok)} out {asset.symbol} per million tokens")
    _say(f"agent     openai SDK, streaming: {prompt!r}\n")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=account["api_key"], max_retries=0)
    last: Any = None
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
        last = chunk if chunk.choices else last
    reason = (last.model_extra or {}).get("tollstream") if last is not None else None
    _say("\n")
    if reason:
        _say(f"cut       finish_reason={last.choices[0].finish_reason}  "
             f"reason={reason['type']}  delivered={reason['delivered_tokens']} tokens")
    else:
        _say("the answer finished before the balance ran out")
    final = httpx.get(f"{url}/v1/balance", timeout=10,
                      headers={"authorization": f"Bearer {account['api_key']}"}).json()
    _say(f"balance   {final['balance']} atomic units left, {final['spent']} spent, "
         f"{final['held']} held")
    return 0
