"""How far the Claude estimate (3 UTF-8 bytes per token, rounded once per stream) is from
real token counts, on text of several kinds.

No tokenizer for current Claude models exists offline, so two real BPE tokenizers stand in for
it (``o200k_base``, ``cl100k_base``; Claude's own averages between them on English). Each
sample is streamed as a model would send it (one delta per token of the proxy tokenizer) and
counted the way the meter counts a Claude stream. Ratio > 1: the estimate over-counts (a cut
stream is billed more tokens than it held; it stops early); < 1: it under-counts.

    python -m benchmarks.estimate_accuracy
"""

from __future__ import annotations

import json
from pathlib import Path

from meters.tokens import TiktokenTokenizer, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def samples() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    prose = " ".join(line for line in readme.splitlines()
                     if line and not line.startswith(("|", "`", " ", "#", "*")))
    code = (ROOT / "gateway" / "relay.py").read_text(encoding="utf-8")
    data = json.dumps([{"id": i, "name": f"item {i}", "price": i * 1.25, "tags": ["a", "b"]}
                       for i in range(200)])
    return {
        "English prose (README)": prose,
        "Python source": code,
        "JSON": data,
        "digits ' 1 1 1'": " 1" * 2000,
        "Chinese": "在河边的老石桥上，每天早上鸟儿都在歌唱。" * 60,
        "German": "Die Verfügbarkeit der Dienstleistungsgesellschaft ist unverzichtbar. " * 60,
    }


def streamed_estimate(text: str, proxy: TiktokenTokenizer) -> int:
    counter = get_tokenizer("estimate").counter()
    total = 0
    ids = proxy.encoding.encode_ordinary(text)
    for token in ids:
        piece = proxy.encoding.decode_single_token_bytes(token).decode("utf-8", "ignore")
        n = counter.measure([piece])
        counter.commit([piece])
        total += n
    return total


def main() -> None:
    proxies = [get_tokenizer("o200k_base"), get_tokenizer("cl100k_base")]
    print(f"{'sample':<26} {'bytes':>7} " + " ".join(
        f"{p.name + ' ratio':>18}" for p in proxies))
    for name, text in samples().items():
        ratios = []
        for proxy in proxies:
            assert isinstance(proxy, TiktokenTokenizer)
            real = proxy.count(text)
            ratios.append(f"{streamed_estimate(text, proxy) / real:>18.2f}")
        print(f"{name:<26} {len(text.encode()):>7} " + " ".join(ratios))


if __name__ == "__main__":
    main()
