"""The sweep's PNG plots (matplotlib, Agg backend): each figure against the stream count, one
line per tollstream ``--workers`` value, one for the peer (and direct where it means
something). A phase with failed streams or cut by its timeout is marked with a red cross."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.report import PLOTS

INSTALL_HINT = "pip install -e '.[bench]'"


class PlotsUnavailable(RuntimeError):
    pass


def require() -> Any:
    """matplotlib's pyplot on the Agg backend, or :class:`PlotsUnavailable` saying how to get
    it (or to run with --no-plots)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise PlotsUnavailable(f"the plots need matplotlib: {INSTALL_HINT} (in the project's "
                               "virtualenv), or run with --no-plots") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _style(key: str) -> dict[str, Any]:
    if key == "direct":
        return {"color": "black", "linestyle": "--", "marker": "o"}
    if key.startswith("litellm"):
        return {"color": "tab:orange", "marker": "s"}
    palette = ["tab:blue", "tab:green", "tab:purple", "tab:cyan"]
    workers = int(key.rsplit("w", 1)[1]) if key[-1:].isdigit() else 1
    return {"color": palette[(workers - 1) % len(palette)], "marker": "o"}


def _lines(ax: Any, series: dict[str, Any], figure: str, *, with_direct: bool,
           linestyle: str | None = None, suffix: str = "") -> None:
    for key, s in series.items():
        if key == "direct" and not with_direct:
            continue
        points = [(c, v) for c, v in zip(s["counts"], s[figure], strict=True) if v is not None]
        if not points:
            continue
        style = _style(key)
        if linestyle:
            style["linestyle"] = linestyle
        ax.plot([c for c, _ in points], [v for _, v in points], label=s["label"] + suffix,
                **style)
        bad = [(c, v) for c, v, e, t in zip(s["counts"], s[figure], s["errors"],
                                              s["timed_out"], strict=True)
               if v is not None and (e or t)]
        if bad:
            ax.plot([c for c, _ in bad], [v for _, v in bad], linestyle="none", marker="x",
                    color="red", markersize=10)


def _axes(ax: Any, counts: list[int], ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xticks(counts)
    ax.set_xticklabels([f"{c:,}" for c in counts])
    ax.minorticks_off()
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
    """Write every plot of :data:`benchmarks.report.PLOTS` into ``out``; their paths."""
    plt = require()
    series = doc["results"]["series"]
    counts = sorted({c for s in series.values() for c in s["counts"]}) or [1]
    profile = doc["settings"]["profile"]
    subtitle = (f"{profile['name']}: {profile['tokens']} tokens per stream, "
                + (f"{profile['rate']:g} tok/s per stream" if profile["rate"] else "burst"))

    def throughput(fig: Any) -> None:
        left, right = fig.subplots(1, 2)
        _lines(left, series, "throughput_vs_direct", with_direct=False)
        left.axhline(1.0, color="black", linestyle="--", linewidth=1, label="direct")
        _axes(left, counts, "tokens/s, proxy / direct")
        _lines(right, series, "tokens_per_s", with_direct=True)
        _axes(right, counts, "tokens/s received (client)")

    def cpu(fig: Any) -> None:
        ax = fig.subplots()
        _lines(ax, series, "cpu_per_token_ms", with_direct=False)
        _axes(ax, counts, "CPU ms per token (process tree, all in)")

    def ttft(fig: Any) -> None:
        left, right = fig.subplots(1, 2)
        _lines(left, series, "ttft_p50_ms", with_direct=True)
        _axes(left, counts, "TTFT p50 (ms)")
        _lines(right, series, "ttft_p99_ms", with_direct=True)
        _axes(right, counts, "TTFT p99 (ms)")

    def rss(fig: Any) -> None:
        ax = fig.subplots()
        _lines(ax, series, "peak_rss_mb", with_direct=False)
        _axes(ax, counts, "peak RSS, MiB (process tree)")

    draw: dict[str, Callable[[Any], None]] = {
        "throughput.png": throughput, "cpu_per_token.png": cpu, "ttft.png": ttft,
        "rss.png": rss}
    written = []
    for name, title in PLOTS.items():
        wide = name in ("throughput.png", "ttft.png")
        fig = plt.figure(figsize=(11 if wide else 6.5, 4.5), layout="constrained")
        draw[name](fig)
        fig.suptitle(f"{title} ({subtitle})", fontsize="medium")
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
