"""The README's first command runs the demo: both stories, as a user runs them (the CLI in its
own process, on embedded defaults), each checked by what it prints."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meters.money import parse_decimal

pytestmark = pytest.mark.timeout(240)


ROOT = Path(__file__).resolve().parent.parent

#: Runs ``tollstream`` with the modules of the test extra's own packages made unimportable:
#: the demo is installed without them (``scripts/demo`` installs the ``chain`` extra).
BOOT = """
import sys
blocked = set(sys.argv.pop(1).split(","))

class TestExtraOnly:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (only in the test extra)")
        return None

sys.meta_path.insert(0, TestExtraOnly())
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def modules_of_the_test_extra() -> set[str]:
    """The top-level modules of the packages only the test extra installs (coverage, which
    measures the subprocess, excepted)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    shipped = {_name(r) for r in project["dependencies"]}
    shipped |= {_name(r) for r in project["optional-dependencies"]["chain"]}
    test_only = {_name(r) for r in project["optional-dependencies"]["test"]}
    test_only -= shipped | {"tollstream", "coverage"}
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if any(_name(d) in test_only for d in dists)}


def demo(*args: str) -> str:
    blocked = ",".join(sorted(modules_of_the_test_extra()))
    result = subprocess.run([sys.executable, "-c", BOOT, blocked, "demo", *args],
                            capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_demo_runs_without_the_test_extra() -> None:
    """What the block covers: pympp was once only in the test extra, and the demo (its MPP
    session client) failed on a fresh machine with ``No module named 'mpp'``."""
    blocked = modules_of_the_test_extra()
    assert {"pytest", "hypothesis", "anthropic", "jsonschema"} <= blocked
    assert not blocked & {"mpp", "x402", "openai", "coverage", "gateway", "meters"}


def test_the_x402_demo_pays_is_cut_tops_up_and_streams_again() -> None:
    out = demo()
    assert out.count("finish_reason=length reason=allowance_exhausted") == 2, out
    assert "paid      2 x402 deposit(s)" in out, out
    ledger = re.search(r"credited (\d+), spent (\d+), balance (\d+), held 0", out)
    assert ledger is not None, out
    credited, spent, balance = map(int, ledger.groups())
    assert credited == spent + balance and spent > 0
    # What the 402s asked was paid and settled on-chain, and that is what the payee got.
    asked = re.findall(r"402       Payment Required: the gateway asks ([\d.]+) USDC", out)
    settled = re.findall(r"settled   deposit of ([\d.]+) USDC: transaction 0x[0-9a-f]{64}", out)
    assert len(asked) == 2 and asked == settled, out
    total = sum(parse_decimal(amount, 6) for amount in settled)
    assert total == credited
    received = re.search(r"gateway's payTo received ([\d.]+)", out)
    assert received is not None and parse_decimal(received.group(1), 6) == total
    assert "And how much does crossing it cost?" in out  # a second, different question


def test_the_mpp_demo_opens_pauses_resumes_tops_up_and_closes() -> None:
    out = demo("--rail", "mpp")
    assert "open      channel 0x" in out, out
    assert out.count("[paused: payment-need-voucher") == out.count(": resumed]") >= 4, out
    assert "top-up first]" in out and "[top-up +0.002 USDC on-chain]" in out, out
    closed = re.search(r"the escrow paid the gateway ([\d.]+) and refunded ([\d.]+)", out)
    received = re.search(r"the gateway \(payee\) received ([\d.]+)", out)
    assert closed is not None and received is not None, out
    assert closed.group(1) == received.group(1)  # what the ledger spent is what the chain paid


def test_the_upto_demo_settles_each_answer_to_the_token_below_its_maximum() -> None:
    out = demo("--rail", "upto")
    maxima = re.findall(r"upto at most ([\d.]+) USDC", out)
    settled = re.findall(r"settled   ([\d.]+) USDC moved on-chain for \d+ prompt \+ (\d+) "
                         r"output tokens \(priced ([\d.]+)\); the payTo received ([\d.]+)", out)
    assert len(maxima) == len(settled) == 2, out
    for maximum, (moved, output, priced, received) in zip(maxima, settled, strict=True):
        # What the chain moved is the answer's price, to the atomic unit, and less than the
        # authorization allowed: the answer was shorter than max_tokens.
        assert moved == priced == received, out
        assert 0 < parse_decimal(moved, 6) < parse_decimal(maximum, 6), out
        assert output == "120", out
    total = re.search(r"gateway's payTo received ([\d.]+); no account", out)
    assert total is not None, out
    assert parse_decimal(total.group(1), 6) == sum(parse_decimal(m[0], 6) for m in settled)
