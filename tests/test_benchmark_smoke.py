"""The benchmark harness runs end to end (a small run; speed targets live in benchmarks/)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def test_quick_benchmark_produces_a_sane_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.loadgen", "--quick", "--json",
                             str(out)], capture_output=True, text=True, timeout=110,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    phases = {(p["profile"], p["target"]): p for p in report["phases"]}
    for profile in ("paced", "burst"):
        direct, gateway = phases[(profile, "direct")], phases[(profile, "gateway")]
        assert direct["tokens"] > 0 and gateway["tokens"] == direct["tokens"]
        assert gateway["gateway_cpu_s"] > 0 and gateway["redis_commands"] > 0
        assert report["profiles"][profile]["same_tokens"] is True
    assert report["cpu_per_request_ms"] > 0 and report["gateway_peak_rss_mb"] > 0
    assert "cpu per request" in result.stdout


def test_mpp_latency_benchmark_runs() -> None:
    """A tiny run of the MPP benchmark: it opens, accepts vouchers and pairs requests (its
    own assertions check every answer), and prints each figure."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.mpp_latency", "--opens", "2",
                             "--vouchers", "5", "--pairs", "4"], capture_output=True,
                            text=True, timeout=110, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    for figure in ("open (relayed", "voucher (HEAD)", "added by the voucher"):
        assert figure in result.stdout


def test_ab_benchmark_runs_two_revisions_side_by_side(tmp_path: Path) -> None:
    """A tiny run of benchmarks/ab.py: two exports of the checked-out commit served side by
    side, every phase completed, a figure per round and a paired ratio for the second."""
    root = Path(__file__).parent.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: benchmarks/ab.py exports revisions with git")
    out = tmp_path / "ab.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.ab", "HEAD", "HEAD~0",
                             "--rounds", "1", "--streams", "2", "--tokens", "5", "--rate",
                             "100", "--requests", "4", "--concurrency", "2", "--json",
                             str(out)], capture_output=True, text=True, timeout=110, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())["figures"]
    assert [f["revision"] for f in figures] == ["HEAD", "HEAD~0"]
    for f in figures:
        assert len(f["per_request_ms"]) == 1 and f["per_request_ms"][0] > 0
        assert f["all_in_ms"][0] > 0 and f["vs_direct"][0] > 0
    assert "HEAD~0/HEAD per chunk: median" in result.stdout
    for f in figures:  # read from each gateway's own metric, over the rounds only
        assert f["gc_full"] == "no full collection" or "full collection" in f["gc_full"]


def test_ab_reports_the_full_collections_between_two_readings() -> None:
    from benchmarks.ab import full_collections

    bounds = ("0.0005", "0.002", "0.01", "0.05", "0.1", "0.5", "+Inf")
    before = (list(zip(bounds, (0.0, 0, 0, 0, 1, 1, 1), strict=True)), 0.07)
    after = (list(zip(bounds, (2.0, 2, 3, 3, 5, 5, 5), strict=True)), 0.37)
    assert full_collections(before, after) == ("4 full collections, 300.0 ms in all, the "
                                               "longest <= 0.1 s")
    assert full_collections(before, before) == "no full collection"
    assert full_collections(None, after).startswith("no figure")


def test_ab_reads_no_collections_from_a_gateway_that_does_not_answer() -> None:
    from benchmarks.ab import gc_histogram
    from gateway.background import free_port

    assert gc_histogram(f"http://127.0.0.1:{free_port()}") is None  # nothing listens there


@pytest.mark.parametrize("declared", [True, False])
def test_ab_hides_an_accelerator_a_revision_does_not_depend_on(tmp_path: Path,
                                                               declared: bool) -> None:
    """A revision whose pyproject.toml does not name hiredis runs without it (redis-py
    falls back to its Python parser), one that does runs with it: an old revision is
    measured as it shipped."""
    from benchmarks.ab import hide_undeclared

    tree = tmp_path / "trees" / "rev"
    tree.mkdir(parents=True)
    deps = '"redis>=5.0",\n' + ('"hiredis>=3.2",\n' if declared else "")
    (tree / "pyproject.toml").write_text(f"[project]\ndependencies = [\n{deps}]\n")
    path = ":".join([str(tree), *hide_undeclared(tree)])
    probe = subprocess.run([sys.executable, "-c", "import redis.utils as u; "
                            "print(u.HIREDIS_AVAILABLE)"], capture_output=True, text=True,
                           timeout=60, env={"PYTHONPATH": path, "PATH": ""})
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(declared)


def test_floor_benchmark_relays_and_reports_every_relay() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.floor", "--streams", "2",
                             "--rate", "20", "--seconds", "3.5"], capture_output=True,
                            text=True, timeout=110, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == [
        "protocol", "streams", "work", "work-task", "work-aiohttp"]
    assert all("us of CPU per chunk" in line for line in lines)
    # The work relays parsed, counted and metered every chunk: one token each.
    for line in lines[2:]:
        counts = re.search(r"\((\d+) chunks, (\d+) tokens metered", line)
        assert counts is not None and int(counts[1]) > 0 and counts[1] == counts[2], line
    assert "Traceback" not in result.stderr
