"""A sweep's figures as series (for the plots and ``sweep.json``) and as Markdown.

``python -m benchmarks.report DIR`` prints the section of ``benchmarks/RESULTS.md`` for the
sweep in DIR (its ``sweep.json``); with ``--plots-into benchmarks/results/NAME`` it copies the
sweep's PNGs there and links them from the section (paths relative to ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

#: The plots a sweep writes: file name, title (plots.py draws them from ``results``).
PLOTS = {"throughput.png": "throughput, proxy / direct",
         "cpu_per_token.png": "proxy CPU per token",
         "ttft.png": "time to first token, p50 and p99",
         "rss.png": "proxy peak resident memory"}

_FIGURES = ("tokens_per_s", "throughput_vs_direct", "cpu_per_token_ms", "ttft_p50_ms",
            "ttft_p99_ms", "peak_rss_mb", "errors", "timed_out")


def results(doc: dict[str, Any]) -> dict[str, Any]:
    """Per series, each figure against the stream count; the peer against each gateway."""
    rows = doc["phases"]
    direct = {r["count"]: r for r in rows if r["series"] == "direct"}
    series: dict[str, Any] = {}
    for entry in doc["series"]:
        mine = sorted((r for r in rows if r["series"] == entry["key"]),
                      key=lambda r: r["count"])
        figures: dict[str, Any] = {"label": entry["label"], "counts": [r["count"] for r in mine]}
        for name in _FIGURES:
            figures[name] = [_figure(r, name, direct.get(r["count"])) for r in mine]
        series[entry["key"]] = figures
    by = {(r["series"], r["count"]): r for r in rows}
    peer_vs: list[dict[str, Any]] = []
    peers = [s["key"] for s in doc["series"] if s["key"].startswith("litellm")]
    gateways = [s["key"] for s in doc["series"] if s["key"].startswith("tollstream")]
    for peer in peers:
        for gateway in gateways:
            for count in sorted({r["count"] for r in rows}):
                theirs, ours = by.get((peer, count)), by.get((gateway, count))
                if not theirs or not ours:
                    continue
                peer_vs.append({
                    "count": count, "peer": peer, "gateway": gateway,
                    "cpu_per_token_ratio": _ratio(theirs["cpu_per_token_ms"],
                                                  ours["cpu_per_token_ms"]),
                    "tokens_per_s_ratio": _ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                    "ttft_p50_ratio": _ratio(theirs["ttft_p50_ms"], ours["ttft_p50_ms"])})
    return {"series": series, "peer_vs_gateway": peer_vs,
            "workers_vs_one": workers_vs_one(doc)}


def workers_vs_one(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each gateway of N > 1 workers against the one-worker gateway at the same count: its
    tokens/s over one worker's (what #13 asks to reach 1.8x with two), and its tokens per
    CPU-second of the whole process tree over one worker's (how much of that came from more
    CPU rather than from less CPU per token)."""
    by = {(r["series"], r["count"]): r for r in doc["phases"]}
    rows: list[dict[str, Any]] = []
    for entry in doc["series"]:
        workers = entry.get("workers", 0)
        if not entry["key"].startswith("tollstream") or workers <= 1:
            continue
        for count in sorted({r["count"] for r in doc["phases"]}):
            many, one = by.get((entry["key"], count)), by.get(("tollstream-w1", count))
            if not many or not one:
                continue
            rows.append({"count": count, "series": entry["key"], "workers": workers,
                         "tokens_per_s_ratio": _ratio(many["tokens_per_s"],
                                                      one["tokens_per_s"]),
                         "tokens_per_cpu_s_ratio": _ratio(_per_cpu(many), _per_cpu(one))})
    return rows


def _per_cpu(row: dict[str, Any]) -> float | None:
    """Tokens delivered per CPU-second of the proxy's process tree."""
    return _ratio(row["tokens"], row.get("proxy_cpu_s"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _figure(row: dict[str, Any], name: str, direct: dict[str, Any] | None) -> Any:
    if name == "throughput_vs_direct":
        return _ratio(row["tokens_per_s"], direct["tokens_per_s"] if direct else None)
    return row[name]


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def table(doc: dict[str, Any]) -> list[str]:
    labels = {s["key"]: s["label"] for s in doc["series"]}
    direct = {r["count"]: r for r in doc["phases"] if r["series"] == "direct"}
    lines = ["| streams | through | tokens | tokens/s | vs direct | TTFT p50 | TTFT p99 | "
             "CPU per token | proxy CPU | peak RSS | simulator CPU | client CPU | failed |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = {s["key"]: i for i, s in enumerate(doc["series"])}
    for r in sorted(doc["phases"], key=lambda r: (r["count"], order.get(r["series"], 99))):
        failed = f"{r['errors']}/{r['requests']}" if r["errors"] else "0"
        if r["timed_out"]:
            failed += f", timed out ({r['completed']}/{r['requests']} done)"
        lines.append(
            f"| {r['count']:,} | {labels.get(r['series'], r['series'])} | {r['tokens']:,} | "
            f"{r['tokens_per_s']:,.0f} | "
            f"{_num(_figure(r, 'throughput_vs_direct', direct.get(r['count'])), 3)} | "
            f"{_num(r['ttft_p50_ms'], 0, ' ms')} | {_num(r['ttft_p99_ms'], 0, ' ms')} | "
            f"{_num(r['cpu_per_token_ms'], 3, ' ms')} | "
            f"{_num(r['proxy_cpu_s'] if r['cpu_per_token_ms'] is not None else None, 1, ' s')}"
            f" | {_num(r['peak_rss_mb'], 0, ' MB')} | {_num(r['sim_cpu_s'], 1, ' s')} | "
            f"{_num(r['client_cpu_s'], 1, ' s')} | {failed} |")
    return lines


def peer_table(doc: dict[str, Any]) -> list[str]:
    rows = doc.get("results", {}).get("peer_vs_gateway") or []
    if not rows:
        return []
    labels = {s["key"]: s["label"] for s in doc["series"]}
    lines = ["| streams | peer | against | peer CPU per token / tollstream's | tollstream "
             "tokens/s / peer's | peer TTFT p50 / tollstream's |", "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['count']:,} | {labels[r['peer']]} | {labels[r['gateway']]} | "
                     f"{_num(r['cpu_per_token_ratio'], 2, 'x')} | "
                     f"{_num(r['tokens_per_s_ratio'], 2, 'x')} | "
                     f"{_num(r['ttft_p50_ratio'], 2, 'x')} |")
    return lines


def workers_table(doc: dict[str, Any]) -> list[str]:
    rows = doc.get("results", {}).get("workers_vs_one") or []
    if not rows:
        return []
    cores = doc["machine"]["cores"]
    lines = ["| streams | workers | tokens/s / one worker's | tokens per CPU-second / one "
             "worker's |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['count']:,} | {r['workers']} | "
                     f"{_num(r['tokens_per_s_ratio'], 2, 'x')} | "
                     f"{_num(r['tokens_per_cpu_s_ratio'], 2, 'x')} |")
    lines += ["", f"(On {cores} cores shared with the load client and the simulator, more "
              "workers add throughput only where one worker was short of CPU and the machine "
              "was not.)"]
    return lines


def markdown(doc: dict[str, Any], *, plots: bool = True, image_dir: str = "",
             heading: str = "#") -> str:
    s = doc["settings"]
    p = s["profile"]
    pace = f"{p['rate']:g} tokens/s per stream" if p["rate"] else "as fast as possible"
    counts = ", ".join(f"{c:,}" for c in s["counts"])
    m = doc["machine"]
    peer = (f"; peer LiteLLM {doc.get('peer_version') or '?'} ({s['peer_workers']} worker"
            f"{'s' if s['peer_workers'] > 1 else ''})" if s.get("peer") else "")
    out = [f"{heading} Sweep over {counts} concurrent streams", "",
           f"Command: `{doc.get('command') or 'python -m benchmarks.loadgen --sweep ...'}`", "",
           f"{p['name']} streams: {p['tokens']} tokens each, {pace}, {p['per_chunk']} token(s) "
           f"per chunk; {s['rounds']} request(s) per stream per phase"
           + (f", streams started over {s['ramp_s']:g} s" if s.get("ramp_s") else "")
           + (f", load client on {s['client']}" if s.get("client") else "")
           + "; tollstream with "
           f"{', '.join(map(str, s['workers']))} worker(s){peer}; phases alternated at each "
           f"count. Machine: {m['cores']} cores, {m['platform']}, Python {m['python']}, open "
           f"files {m['open_files'][0]}; commit {doc.get('commit')}; {doc.get('started')} to "
           f"{doc.get('finished', '(not finished)')}.", "",
           "CPU per token: the proxy's whole process tree (parent and workers), all in (per "
           "request costs included), over the tokens the client received. Peak RSS: summed "
           "over the tree, sampled every 0.5 s. vs direct: the proxy's tokens/s over the "
           "direct phase's at the same count.", "", *table(doc), ""]
    peer_lines = peer_table(doc)
    if peer_lines:
        out += ["The peer against tollstream, same counts, same run:", "", *peer_lines, ""]
    worker_lines = workers_table(doc)
    if worker_lines:
        out += ["Several workers against one, same counts, same run:", "", *worker_lines, ""]
    for skipped in doc.get("skipped", []):
        out.append(f"- {skipped['count']:,} streams skipped: {skipped['reason']}")
    for note in doc.get("notes", []):
        out.append(f"- {note}")
    if doc.get("skipped") or doc.get("notes"):
        out.append("")
    if plots:
        prefix = f"{image_dir.rstrip('/')}/" if image_dir else ""
        out += [f"![{title}]({prefix}{name})" for name, title in PLOTS.items()] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Print a sweep's section of RESULTS.md.")
    parser.add_argument("sweep", type=Path, help="the sweep's directory (or its sweep.json)")
    parser.add_argument("--plots-into", type=Path, help="copy the PNGs here (e.g. "
                        "benchmarks/results/sweep-2026-12-10) and link them from the section")
    parser.add_argument("--date", help="the section's date (default: the sweep's)")
    args = parser.parse_args(argv)
    source = args.sweep / "sweep.json" if args.sweep.is_dir() else args.sweep
    doc = json.loads(source.read_text())
    image_dir = ""
    if args.plots_into:
        args.plots_into.mkdir(parents=True, exist_ok=True)
        for name in PLOTS:
            if (source.parent / name).exists():
                shutil.copy2(source.parent / name, args.plots_into / name)
        benchmarks = Path(__file__).parent.resolve()
        target = args.plots_into.resolve()
        image_dir = (str(target.relative_to(benchmarks)) if target.is_relative_to(benchmarks)
                     else str(target))
    date = args.date or str(doc.get("started", ""))[:10]
    text = markdown(doc, plots=bool(args.plots_into), image_dir=image_dir, heading="##")
    sys.stdout.write(text.replace("## Sweep over", f"## {date}, sweep over", 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
