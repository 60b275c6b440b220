"""The operator's status page (#14) in a real headless browser: signing in with the admin token
(a wrong one is refused), then live streams, tokens and revenue per model with a chart, the
latest cuts, and the ledger's health; a screenshot of it is written by the test run
(``test-artifacts/status-page.png``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.browser import Browser
from tests.conftest import ADMIN_TOKEN, RunningGateway

pytestmark = pytest.mark.timeout(120)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def traffic(gw: RunningGateway) -> None:
    """Two answers and a cut, for the page to show."""
    _, key = gw.create_account(60)
    for tokens in (20, 100):  # the second one is cut at the 40 tokens left
        answer = httpx.post(f"{gw.url}/v1/chat/completions", timeout=20,
                            headers={"authorization": f"Bearer {key}"},
                            json={"model": "exact", "stream": True, "max_tokens": tokens,
                                  "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200


def test_the_status_page_in_a_browser(gw: RunningGateway) -> None:
    traffic(gw)
    with Browser() as browser:
        browser.open(f"{gw.url}/admin/")
        assert browser.evaluate("document.querySelector('form') !== null")  # sign in first
        assert "Live streams" not in browser.evaluate("document.body.innerText")
        for token, expect in (("wrong-token-0123456789", "wrong admin token"),
                              (ADMIN_TOKEN, "status")):
            browser.evaluate(
                f"document.querySelector('input[name=token]').value = {json.dumps(token)};"
                "document.querySelector('form').submit()")
            browser.wait_for(f"document.body.innerText.includes({json.dumps(expect)})")
        text = browser.evaluate("document.body.innerText")
        assert "live streams" in text and "exact" in text and "allowance" not in text
        assert "cut" in text  # the second answer was cut
        assert "tokens, last 15 min" in text and "ok (" in text  # the ledger answers
        assert browser.evaluate("document.querySelectorAll('svg rect').length") == 15
        assert browser.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
        shot = browser.screenshot(ARTIFACTS / "status-page.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_page_wants_the_token(gw: RunningGateway) -> None:
    anonymous = httpx.get(f"{gw.url}/admin/", timeout=10)
    assert anonymous.status_code == 401 and "<form" in anonymous.text
    forged = httpx.get(f"{gw.url}/admin/", timeout=10, cookies={"tollstream_admin": "x" * 64})
    assert forged.status_code == 401
    scripted = httpx.get(f"{gw.url}/admin/", timeout=10,
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert scripted.status_code == 200 and "Ledger health" in scripted.text
    assert scripted.headers["cache-control"] == "no-store"
