"""``tollstream wallet`` refuses what it cannot run safely, with one line naming the option
and exit status 2, before it listens anywhere; the key never appears in what it prints.
(The proxy paying for real agents: tests/test_agents.py.)"""

from __future__ import annotations

import pytest

from gateway.cli import main

KEY = "0x" + "11" * 32
GATEWAY = ["wallet", "--gateway", "http://127.0.0.1:9"]


@pytest.mark.parametrize(("argv", "env", "names"), [
    (["--cap", "1", "--host", "0.0.0.0"], {"WALLET_KEY": KEY}, "--host must be a loopback"),
    (["--cap", "1"], {}, "set WALLET_KEY"),
    (["--cap", "1", "--key-env", "MY_KEY"], {}, "set MY_KEY"),
    (["--cap", "1"], {"WALLET_KEY": "0xnot-a-key"}, "WALLET_KEY is not a private key"),
    (["--cap", "1.0000001"], {"WALLET_KEY": KEY}, "--cap"),
    (["--cap", "lots"], {"WALLET_KEY": KEY}, "--cap"),
    (["--cap", "1", "--allow", "eip155:8453"], {"WALLET_KEY": KEY}, "--allow takes"),
    (["--cap", "1", "--rail", "mpp", "--deposit", "2"], {"WALLET_KEY": KEY},
     "--deposit must be above 0 and at most --cap"),
    (["--cap", "1", "--rail", "mpp", "--increment", "0"], {"WALLET_KEY": KEY},
     "--increment above 0"),
    (["--cap", "1", "--rail", "mpp", "--deposit", "x"], {"WALLET_KEY": KEY}, "--deposit"),
])
def test_refused_with_the_option_named(argv: list[str], env: dict[str, str], names: str,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WALLET_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(GATEWAY + argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tollstream wallet: "), out.err
    assert names in lines[0]
    assert KEY not in out.err and KEY[2:] not in out.err
