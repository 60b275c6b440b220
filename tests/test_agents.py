"""Real agents, unmodified (#8): Claude Code and Codex CLI, installed by the project's own
scripts (npm dev dependencies, pinned), answer through tollstream and the simulator, paid by an
operator-funded key or by themselves through `tollstream wallet` on the local chain.

Each agent runs with a fresh home, telemetry and updates off, and talks only to 127.0.0.1
(its base URL); a recording proxy in front of the gateway counts what it sent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.chain.devchain import DevChain
from gateway.rails.evm import EvmNetwork, EvmSettler
from gateway.rails.x402_deposits import payer_account_id
from meters.channels import account_of
from meters.money import parse_decimal
from meters.rates import Prompt, Rate
from tests.chain_fixtures import *  # noqa: F403  (session fixtures: chain, evm_network, settler)
from tests.chain_fixtures import new_account
from tests.conftest import RunningGateway, sim_stats
from tests.recorder import Recorder, recording_proxy
from tests.servers import free_port
from tests.test_mpp_session import session_config
from tests.test_x402_gateway import x402_config

BIN = Path(__file__).resolve().parents[1] / "node_modules" / ".bin"
CLAUDE, CODEX = BIN / "claude", BIN / "codex"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not (CLAUDE.exists() and CODEX.exists()),
                       reason="agents not installed: run scripts/install (npm ci)"),
]

Factory = Callable[..., contextlib.AbstractContextManager[RunningGateway]]
ROUTES = [
    {"match": "claude-*", "upstream": "sim", "dialect": "anthropic_messages",
     "tokenizer": "estimate"},
    {"match": "gpt-*", "upstream": "sim", "dialect": "openai_responses"},
]
PROMPT = "Say hello."


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float


def agent_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "OPENAI_", "CLAUDE_", "CODEX_"))}
    env.update(HOME=str(home), CODEX_HOME=str(home / ".codex"), DISABLE_TELEMETRY="1",
               DISABLE_AUTOUPDATER="1", DISABLE_ERROR_REPORTING="1",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", NO_COLOR="1")
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    return env


def claude(base_url: str, key: str, home: Path, *, sim_tokens: int = 40) -> Run:
    """Claude Code in its normal (non --bare) print mode."""
    env = agent_env(home)
    env.update(ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY=key,
               ANTHROPIC_CUSTOM_HEADERS=f"x-sim-output-tokens: {sim_tokens}")
    return _run([str(CLAUDE), "-p", PROMPT], env, home)


def codex(base_url: str, key: str, home: Path, *, sim_tokens: int = 40) -> Run:
    """Codex CLI with tollstream as a custom Responses provider (what the README shows)."""
    env = agent_env(home)
    env["TOLLSTREAM_KEY"] = key
    provider = (f'model_providers.tollstream={{name="tollstream", base_url="{base_url}/v1", '
                f'env_key="TOLLSTREAM_KEY", wire_api="responses", '
                f'http_headers={{"x-sim-output-tokens"="{sim_tokens}"}}, '
                f'request_max_retries=0, stream_max_retries=0}}')
    return _run([str(CODEX), "exec", "--skip-git-repo-check", "-c",
                 "model_provider=tollstream", "-c", provider, "-c",
                 "analytics.enabled=false", PROMPT], env, home)


def _run(argv: list[str], env: dict[str, str], home: Path) -> Run:
    started = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    return Run(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


def expected_charge(sim: str, rate: Rate) -> int:
    """The billing rule for completed answers: the usage the upstream reported, priced."""
    return sum(rate.charge(Prompt(r["input"] - r["cached"], r["cached"]), r["output"])
               for r in sim_stats(sim)["reported"])


@pytest.fixture
def agw(gateway_factory: Factory) -> Iterator[RunningGateway]:
    with gateway_factory(routes=ROUTES) as running:
        yield running


@pytest.fixture
def front(agw: RunningGateway) -> Iterator[Recorder]:
    with recording_proxy(agw.url) as recorder:
        yield recorder


AGENTS = {"claude": (claude, "/v1/messages", "claude-opus-5-5"),
          "codex": (codex, "/v1/responses", "gpt-6.1-sol")}


@pytest.mark.parametrize("name", AGENTS)
def test_agent_answers_with_an_operator_funded_key(
        agw: RunningGateway, front: Recorder, sim: str, tmp_path: Path, name: str) -> None:
    run_agent, path, model = AGENTS[name]
    account, key = agw.create_account(10_000_000)  # 10 USDC
    run = run_agent(front.url, key, tmp_path)
    assert run.code == 0, (run.out, run.err)
    assert "quick brown fox" in run.out
    assert front.count(path, 200) >= 1 and front.count(path) == front.count(path, 200)
    rate = agw.gateway.router.resolve(model, _dialect(path)).rate
    state = agw.balance(account)
    assert state["held"] == "0"
    assert int(state["spent"]) == expected_charge(sim, rate) > 0
    assert int(state["balance"]) == 10_000_000 - int(state["spent"])


def _dialect(path: str) -> Any:
    from gateway.dialects import get_dialect
    return get_dialect("anthropic_messages" if path == "/v1/messages" else "openai_responses")


@pytest.mark.parametrize("name", AGENTS)
def test_agent_stops_cleanly_on_a_cut_and_on_a_402(
        agw: RunningGateway, front: Recorder, sim: str, tmp_path: Path, name: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_agent, path, model = AGENTS[name]
    resolved = agw.gateway.router.resolve(model, _dialect(path))
    token_price = resolved.rate.output_per_mtok // 1_000_000
    # What the agent's request needs before the first token (the gateway's estimate of its
    # prompt plus one output token), from a request it sends on a funded run.
    _, rich_key = agw.create_account(10_000_000)
    assert run_agent(front.url, rich_key, tmp_path / "probe", sim_tokens=1).code == 0
    parsed = resolved.dialect.parse_request(orjson.loads(front.bodies[-1]))
    needed = resolved.rate.charge(
        resolved.tokenizer.count(parsed.prompt_text) + parsed.prompt_overhead, 1)
    sent = front.count(path)
    # Enough for that and five more tokens; a long answer is cut at the last paid token.
    poor, poor_key = agw.create_account(needed + 5 * token_price)
    cut = run_agent(front.url, poor_key, tmp_path / "cut", sim_tokens=5000)
    state = agw.balance(poor)
    assert state["held"] == "0" and int(state["balance"]) < 3 * token_price
    assert int(state["spent"]) > 0
    cut_requests = front.requests[sent:]
    assert len(cut_requests) <= 3, cut_requests  # no loop that keeps asking
    # With nothing left: 402, the agent stops, and no upstream call is made.
    _, broke_key = agw.create_account(0)
    before, sent = sim_stats(sim)["streams_started"], len(front.requests)
    unpaid = run_agent(front.url, broke_key, tmp_path / "unpaid")
    assert unpaid.code != 0
    unpaid_requests = front.requests[sent:]
    assert 1 <= len(unpaid_requests) <= 3 and all(s == 402 for _, _, s in unpaid_requests)
    assert sim_stats(sim)["streams_started"] == before
    with capsys.disabled():
        print(f"\n[{name}] cut: exit {cut.code}, requests {[s for _, _, s in cut_requests]}, "
              f"shows {cut.out.strip()[-120:]!r} / {cut.err.strip()[-160:]!r}"
              f"\n[{name}] 402: exit {unpaid.code}, requests "
              f"{[s for _, _, s in unpaid_requests]}, shows "
              f"{(unpaid.out + unpaid.err).strip()[-240:]!r}")


# -- paying by themselves, through the wallet proxy ----------------------------------------------

@contextlib.contextmanager
def wallet_proxy(gateway: str, key: str, cap: str, *extra: str
                 ) -> Iterator[tuple[str, list[str]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "wallet", "--gateway", gateway, "--cap", cap,
         "--port", str(port), *extra], env={**os.environ, "WALLET_KEY": key},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("wallet proxy did not start") from None
                time.sleep(0.1)
        yield url, lines
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=5)
        lines.extend(err.splitlines())


@pytest.fixture
def xagw(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(routes=ROUTES, x402=x402_config(chain, deposit="0.10")) as running:
        yield running


@pytest.mark.parametrize(("name", "wallet_index"), [("claude", 9), ("codex", 10)])
async def test_agent_pays_by_itself_through_the_wallet_proxy(
        xagw: RunningGateway, chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        tmp_path: Path, name: str, wallet_index: int) -> None:
    run_agent, path, _ = AGENTS[name]
    wallet = chain.wallets[wallet_index]
    deposit = 100_000  # 0.10 USDC
    payer_before = await settler.balance_of(wallet.address, evm_network)
    with recording_proxy(xagw.url) as front, \
            wallet_proxy(front.url, wallet.private_key, cap="0.15") as (url, lines):
        first = run_agent(url, "not-a-tollstream-key", tmp_path / "one")
        assert first.code == 0, (first.out, first.err)
        assert "quick brown fox" in first.out
        # One 402, one paid request: the agent itself never saw the 402.
        assert front.count(path, 402) == 1 and front.count(path, 200) >= 1
        # Answer after answer spends the deposit; the next one needs a second deposit, which
        # the 0.15 cap does not allow: the agent gets the 402 and stops.
        runs = [run_agent(url, "not-a-tollstream-key", tmp_path / f"run{i}", sim_tokens=2000)
                for i in range(4)]
        refused = [run for run in runs if run.code != 0]
    assert refused, [(r.code, r.err[-300:]) for r in runs]
    assert any("not paying" in line and "cap" in line for line in lines), lines
    payer_after = await settler.balance_of(wallet.address, evm_network)
    assert payer_before - payer_after == deposit  # exactly one deposit on-chain
    account = payer_account_id(evm_network.network, evm_network.asset, wallet.address)
    state = xagw.balance(account)
    assert state["credited"] == str(deposit) and state["held"] == "0"
    assert int(state["balance"]) + int(state["spent"]) == deposit
    assert any("paid 0.1 on" in line and "settled" in line for line in lines), lines
    assert any("1 payment(s), 0.1 in all" in line for line in lines), lines


@pytest.fixture
def magw(gateway_factory: Factory, chain: DevChain) -> Iterator[RunningGateway]:
    with gateway_factory(routes=ROUTES, mpp=session_config(
            chain, suggested_deposit="1.00", min_deposit="0.01",
            min_voucher_delta="0.001", session_pause_timeout_seconds=10)) as running:
        yield running


@pytest.mark.parametrize("name", ["claude", "codex"])
async def test_agent_pays_by_itself_through_an_mpp_session(
        magw: RunningGateway, chain: DevChain, evm_network: EvmNetwork, settler: EvmSettler,
        tmp_path: Path, name: str) -> None:
    """The wallet proxy opens one channel (relayed: the wallet holds no ETH), pays every
    request and paused stream with vouchers, and closes the channel when it stops: the payee
    gets exactly what the ledger says was spent, the wallet the rest."""
    run_agent, path, _ = AGENTS[name]
    wallet = new_account(chain, tokens=2_000_000)
    payee_before = await settler.balance_of(chain.relayer_address, evm_network)
    with recording_proxy(magw.url) as front, wallet_proxy(
            front.url, wallet.key.hex(), "2.00", "--rail", "mpp", "--deposit", "1.00",
            "--increment", "0.02") as (url, lines):
        runs = [run_agent(url, "not-a-tollstream-key", tmp_path / f"run{i}", sim_tokens=300)
                for i in range(2)]
        for run in runs:
            assert run.code == 0, (run.out, run.err)
            assert "quick brown fox" in run.out
        assert front.count(path, 402) >= 1  # the first request, answered by the open
        assert front.count(path, 200) >= 2
    closed = [line for line in lines if "closed (transaction 0x" in line]
    assert len(closed) == 1, "\n".join(lines)
    spent = parse_decimal(closed[0].split("spent ")[1].split(" ")[0], 6)
    channel = next(line for line in lines if "session 0x" in line).split("session ")[1][:66]
    state = magw.balance(account_of(channel))
    assert int(state["spent"]) == spent > 0 and state["held"] == "0"
    assert await settler.balance_of(chain.relayer_address, evm_network) == payee_before + spent
    assert await settler.balance_of(wallet.address, evm_network) == 2_000_000 - spent


def test_codex_builtin_provider_falls_back_from_websocket_at_once(
        agw: RunningGateway, sim: str, tmp_path: Path) -> None:
    """Codex's built-in OpenAI provider opens the Responses WebSocket first; the gateway's 426
    makes it use HTTP within the same turn: one refusal, no retries, then the answer."""
    account, key = agw.create_account(10_000_000)
    env = agent_env(tmp_path)
    env["CODEX_API_KEY"] = key
    run = _run([str(CODEX), "exec", "--skip-git-repo-check", "-c",
                f"openai_base_url={agw.url}/v1", "-c", "analytics.enabled=false", PROMPT],
               env, tmp_path)
    assert run.code == 0, (run.out, run.err)
    assert "quick brown fox" in run.out
    metrics = httpx.get(f"{agw.url}/metrics", timeout=10).text
    assert "tollstream_websocket_refused_total 1.0" in metrics
    rate = agw.gateway.router.resolve("gpt-6.1-sol", _dialect("/v1/responses")).rate
    assert int(agw.balance(account)["spent"]) == expected_charge(sim, rate) > 0


def test_agents_are_pinned() -> None:
    for binary, version in ((CLAUDE, "2.1.331"), (CODEX, "0.169.0")):
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        assert version in out, out
    assert shutil.which("node") is not None
