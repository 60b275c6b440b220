"""Operator experience (#14): accounts from the command line through the admin API (listed a
page at a time), a configuration checked without starting anything, a server that says what it
started, ``--version``; every bad input a clear line and exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.summary import masked_url
from tests.conftest import ADMIN_TOKEN, RunningGateway, track_prefix
from tests.servers import free_port, gateway_process

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def accounts(gw: RunningGateway, *args: str, token: str = ADMIN_TOKEN
             ) -> subprocess.CompletedProcess[str]:
    return cli("accounts", "--gateway", gw.url, "--admin-token", token, *args)


def refused(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # one line


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("tollstream ")


def test_accounts_from_the_command_line(gw: RunningGateway) -> None:
    created = accounts(gw, "--json", "create", "--balance", "2.50", "--label", "ops")
    assert created.returncode == 0, created.stderr
    account = json.loads(created.stdout)
    assert account["balance"] == "2500000" and account["api_key"].startswith("tsk_")
    account_id = account["account_id"]
    for _ in range(2):  # the same idempotency key credits once
        credited = accounts(gw, "credit", account_id, "--amount", "1000",
                            "--idempotency-key", "invoice-7")
        assert credited.returncode == 0, credited.stderr
    shown = accounts(gw, "show", account_id)
    assert shown.returncode == 0 and "2.501" in shown.stdout and account_id in shown.stdout
    rotated = accounts(gw, "rotate-key", account_id)
    assert rotated.returncode == 0 and "new API key tsk_" in rotated.stdout
    listed = json.loads(accounts(gw, "--json", "list", "--all", "--limit", "1").stdout)
    assert account_id in [row["account_id"] for row in listed["data"]]
    assert listed["next_cursor"] is None


def test_bad_input_is_one_line_and_exit_2(gw: RunningGateway) -> None:
    account = json.loads(accounts(gw, "--json", "create").stdout)["account_id"]
    refused(accounts(gw, "show", account, token="wrong-token-0123456789"), "401")
    refused(accounts(gw, "show", "acct_nope"), "404")
    for amount in ("2.5.0", "-1", "1e3", "0.0000001", "abc"):
        refused(accounts(gw, "credit", account, "--amount", amount), "amount")
    port = free_port()  # nothing listens there
    refused(cli("accounts", "--gateway", f"http://127.0.0.1:{port}", "--admin-token",
                ADMIN_TOKEN, "list"), "unreachable")
    refused(cli("accounts", "list", env={"TOLLSTREAM_ADMIN_TOKEN": ""}), "no admin token")


def test_accounts_are_listed_a_page_at_a_time(gw: RunningGateway) -> None:
    ids = {gw.create_account(i)[0] for i in range(5)}
    seen: list[str] = []
    cursor: str | None = "0"
    with gw.admin() as admin:
        while cursor is not None:
            page = admin.get("/admin/accounts", params={"cursor": cursor, "limit": "2",
                                                        "kind": "acct"}).json()
            seen += [row["account_id"] for row in page["data"]]
            cursor = page["next_cursor"]
        assert ids <= set(seen) and len(seen) == len(set(seen))
        assert admin.get("/admin/accounts", params={"kind": "x402"}).json()["data"] == []
        labelled = admin.post("/admin/accounts", json={"label": "x402 0xAbC123"}).json()
        found = admin.get("/admin/accounts", params={"payer": "0xabc123", "limit": "500"}
                          ).json()["data"]
        assert labelled["account_id"] in [row["account_id"] for row in found]
        assert all("0xabc123" in row["label"].lower() for row in found)
        for params, param in (({"cursor": "x"}, "cursor"), ({"limit": "0"}, "limit"),
                              ({"kind": "nope"}, "kind"), ({"payer": "0x 1"}, "payer")):
            bad = admin.get("/admin/accounts", params=params)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param
    assert httpx.get(f"{gw.url}/admin/accounts", timeout=10).status_code == 401


def test_config_check(tmp_path: Path) -> None:
    good = cli("config", "check", env={"TOLLSTREAM_ADMIN_TOKEN": "a-secret-admin-token-42"})
    assert good.returncode == 0, good.stderr
    assert "a-secret-admin-token-42" not in good.stdout and "**********" in good.stdout
    assert "out/token atomic" in good.stdout and "gpt-6.1-sol" in good.stdout
    config = tmp_path / "bad.toml"
    config.write_text('[upstreams.u]\nbase_url = "http://x/v1"\n'
                      '[models.m]\nupstream = "u"\noutput_per_mtok = "0.0000001"\n')
    refused(cli("config", "check", "--config", str(config)), "models.m.output_per_mtok")


def test_serve_says_what_it_started(tmp_path: Path, sim: str) -> None:
    port = free_port()
    prefix = track_prefix("tops:")
    config = tmp_path / "gateway.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nembedded_redis_port = {port}\n'
                      f'key_prefix = "{prefix}"\n[upstreams.sim]\nbase_url = "{sim}/v1"\n'
                      '[models.m]\nupstream = "sim"\noutput_per_mtok = "1"\n')
    with gateway_process(str(config)) as (url, proc):
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    text = err.decode()
    assert f"embedded Valkey at redis://127.0.0.1:{port}" in text
    assert "admin API: off (set TOLLSTREAM_ADMIN_TOKEN)" in text
    assert "rails:     none" in text and "\ntollstream:   m " in text


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:hunter2@db.internal:6380/0", "redis://:***@db.internal:6380/0"),
    ("rediss://ops:hunter2@db", "rediss://ops:***@db"),
    ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379")])
def test_redis_passwords_are_never_shown(url: str, shown: str) -> None:
    assert masked_url(url) == shown


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_one_searchable_log_line_per_request(tmp_path: Path, sim: str, redis_url: str,
                                             fmt: str) -> None:
    from tests.test_faults import write_config

    config = write_config(sim, redis_url, track_prefix(f"tlog{fmt}:"), log_format=fmt)
    with gateway_process(config, log_level="info") as (url, proc):
        with httpx.Client(base_url=url, timeout=10,
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            created = admin.post("/admin/accounts", json={"balance": "1000"}).json()
        key, account = created["api_key"], created["account_id"]
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=20,
                            headers={"authorization": f"Bearer {key}"},
                            json={"model": "exact", "stream": True, "max_tokens": 5,
                                  "messages": [{"role": "user", "content": "hi"}]})
        request_id = answer.headers["x-request-id"]
        missing = httpx.post(f"{url}/v1/chat/completions", json={}, timeout=10)
        assert missing.status_code == 400 and missing.headers["x-request-id"] != request_id
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    text = err.decode()
    assert key not in text and "tsk_" not in text  # no key is ever logged
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        [line] = [entry for entry in lines if entry["logger"] == "tollstream.request"]
        assert line["request_id"] == request_id and line["account"] == account
        assert (line["model"], line["outcome"], line["output_tokens"], line["charged"]) == (
            "exact", "completed", 5, "5")
        assert line["duration_ms"] > 0
    else:
        assert f"tollstream.request: request {request_id} exact completed account={account}" \
            in text
