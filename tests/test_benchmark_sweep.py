"""The benchmark sweep runs end to end (tiny counts; speed is benchmarks/RESULTS.md's business):
JSON, Markdown and PNG plots, a count the open-file limit cannot run reported and skipped, the
LiteLLM peer skipped with the way to install it when it is not installed."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import plots, report

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).parent.parent
TOKENS = 10


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def limit_open_files() -> None:
    """In the sweep's process: a hard limit of 1,024 open files, so 5,000 streams cannot run."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_tiny_sweep_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", "--sweep", "2,4,5000", "--workers", "1",
         "--rate", "200", "--tokens", str(TOKENS), "--timeout", "30", "--peer", "litellm",
         "--ramp", "0.2", "--progress", "--out", str(out)],
        capture_output=True, text=True, timeout=100, cwd=ROOT, preexec_fn=limit_open_files,
        env={**os.environ,
             "TOLLSTREAM_BENCH_LITELLM_VENV": str(tmp_path / "no-litellm")})
    # Exit 1: the 5,000-stream count was skipped (everything else ran).
    assert result.returncode == 1, result.stderr[-3000:]
    doc = json.loads((out / "sweep.json").read_text())

    assert [s["key"] for s in doc["series"]] == ["direct", "tollstream-w1"]
    assert doc["settings"]["counts"] == [2, 4, 5000] and doc["finished"]
    assert [s["count"] for s in doc["skipped"]] == [5000]
    assert "ulimit -n" in doc["skipped"][0]["reason"]
    assert "benchmarks/litellm/install" in doc["notes"][0]
    assert "benchmarks/litellm/install" in result.stderr
    for row in doc["phases"]:
        assert not row["errors"] and not row["timed_out"], row
        assert row["tokens"] == row["count"] * TOKENS and row["completed"] == row["count"]

    series = doc["results"]["series"]
    direct, gateway = series["direct"], series["tollstream-w1"]
    for figures in (direct, gateway):
        assert figures["counts"] == [2, 4]
        assert all(len(figures[name]) == 2 for name in (
            "tokens_per_s", "throughput_vs_direct", "cpu_per_token_ms", "ttft_p50_ms",
            "ttft_p99_ms", "peak_rss_mb", "errors", "timed_out"))
        assert all(v > 0 for v in figures["tokens_per_s"] + figures["ttft_p50_ms"])
    assert direct["throughput_vs_direct"] == [1.0, 1.0]
    assert direct["cpu_per_token_ms"] == [None, None] and direct["peak_rss_mb"] == [None, None]
    assert all(v > 0 for v in gateway["throughput_vs_direct"] + gateway["cpu_per_token_ms"]
               + gateway["peak_rss_mb"])
    assert doc["results"]["peer_vs_gateway"] == []

    markdown = (out / "sweep.md").read_text()
    assert "| streams | through |" in markdown and "| 4 | tollstream (1 worker) |" in markdown
    assert "5,000 streams skipped" in markdown
    for name in report.PLOTS:
        width, height = png_size(out / name)
        assert width >= 400 and height >= 300, name
        assert f"]({name})" in markdown
    # The progress line (stderr is a pipe here: one line per phase, at its end).
    assert "4 streams, tollstream (1 worker): 4/4 streams" in result.stderr


def test_report_writes_the_results_section(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.report`` on a recorded sweep: the section of RESULTS.md, the
    peer's ratios, the plots copied where its links point."""
    doc = {"version": 1, "started": "2026-12-10T10:00:00+0000", "finished": "x",
           "command": "python -m benchmarks.loadgen --sweep 64,256", "commit": "abc1234",
           "machine": {"cores": 2, "platform": "Linux", "python": "3.11", "open_files": [9, 9]},
           "settings": {"counts": [64, 256], "workers": [1], "rounds": 1, "timeout_s": 60,
                        "lease_tokens": 64, "peer": "litellm", "peer_workers": 1,
                        "profile": {"name": "paced", "rate": 2.0, "per_chunk": 1,
                                    "tokens": 40}},
           "peer_version": "1.106.12", "skipped": [], "notes": [],
           "series": [{"key": "direct", "label": "direct", "workers": 0},
                      {"key": "tollstream-w1", "label": "tollstream (1 worker)", "workers": 1},
                      {"key": "litellm-w1", "label": "litellm (1 worker)", "workers": 1}],
           "phases": []}
    for count in (64, 256):
        for key, cpu in (("direct", None), ("tollstream-w1", 0.5), ("litellm-w1", 3.0)):
            doc["phases"].append({
                "series": key, "count": count, "requests": count, "completed": count,
                "tokens": count * 40, "tokens_per_s": 2.0 * count, "ttft_p50_ms": 500.0,
                "ttft_p99_ms": 900.0, "errors": 0, "error": "", "timed_out": False,
                "cpu_per_token_ms": cpu, "proxy_cpu_s": 1.0, "peak_rss_mb": cpu and 100.0,
                "sim_cpu_s": 1.0, "client_cpu_s": 1.0})
    doc["results"] = report.results(doc)
    assert [r["cpu_per_token_ratio"] for r in doc["results"]["peer_vs_gateway"]] == [6.0, 6.0]
    sweep = tmp_path / "run"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps(doc))
    plots.write_all(doc, sweep)
    into = tmp_path / "plots"
    assert report.main([str(sweep), "--plots-into", str(into)]) == 0
    section = capsys.readouterr().out
    assert section.startswith("## 2026-12-10, sweep over 64, 256 concurrent streams")
    assert "Command: `python -m benchmarks.loadgen --sweep 64,256`" in section
    assert "| 256 | litellm (1 worker) | tollstream (1 worker) | 6.00x |" in section
    assert f"]({into}/throughput.png)" in section
    assert all(png_size(into / name) for name in report.PLOTS)


def test_plots_name_the_install_when_matplotlib_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(plots.PlotsUnavailable, match=r"pip install -e '\.\[bench\]'"):
        plots.require()


def test_report_sets_several_workers_against_one() -> None:
    """Two workers against one at each count: tokens/s (the issue's 1.8x) and tokens per
    CPU-second of the process tree, side by side, in the results and the section."""
    doc: dict[str, object] = {
        "started": "2026-12-10T10:00:00+0000", "machine": {
            "cores": 4, "platform": "Linux", "python": "3.11", "open_files": [9, 9]},
        "settings": {"counts": [64, 1000], "workers": [1, 2], "rounds": 1,
                     "profile": {"name": "paced", "rate": 20.0, "per_chunk": 1,
                                 "tokens": 100}},
        "series": [{"key": "direct", "label": "direct", "workers": 0},
                   {"key": "tollstream-w1", "label": "tollstream (1 worker)", "workers": 1},
                   {"key": "tollstream-w2", "label": "tollstream (2 workers)", "workers": 2}],
        "phases": []}
    # (tokens/s, proxy CPU seconds) per series and count; every phase delivers 10,000 tokens.
    figures = {("direct", 64): (1280.0, 0.0), ("tollstream-w1", 64): (1270.0, 0.5),
               ("tollstream-w2", 64): (1275.0, 0.6), ("direct", 1000): (20000.0, 0.0),
               ("tollstream-w1", 1000): (9000.0, 1.0), ("tollstream-w2", 1000): (17100.0, 1.25)}
    phases = []
    for (key, count), (rate, cpu) in figures.items():
        phases.append({"series": key, "count": count, "requests": count,
                       "completed": count, "tokens": 10_000, "tokens_per_s": rate,
                       "ttft_p50_ms": 100.0, "ttft_p99_ms": 200.0, "errors": 0,
                       "error": "", "timed_out": False,
                       "cpu_per_token_ms": cpu / 10 if cpu else None,
                       "proxy_cpu_s": cpu, "peak_rss_mb": 100.0 if cpu else None,
                       "sim_cpu_s": 1.0, "client_cpu_s": 1.0})
    doc["phases"] = phases
    doc["results"] = results = report.results(doc)
    rows = results["workers_vs_one"]
    assert [(r["count"], r["workers"]) for r in rows] == [(64, 2), (1000, 2)]
    assert rows[1]["tokens_per_s_ratio"] == pytest.approx(1.9)
    assert rows[1]["tokens_per_cpu_s_ratio"] == pytest.approx(0.8)  # 8,000 / 10,000
    section = report.markdown(doc, plots=False)
    assert "Several workers against one" in section
    assert "| 1,000 | 2 | 1.90x | 0.80x |" in section
    assert "| 64 | 2 | 1.00x | 0.83x |" in section
