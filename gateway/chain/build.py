"""Compile ``TestUSDC.vy`` into the committed artifact ``TestUSDC.json``.

The artifact is committed so the gateway and its tests can deploy the token without vyper
installed; ``--check`` lets CI prove the artifact still matches the source.

Usage::

    python -m gateway.chain.build          # rebuild TestUSDC.json
    python -m gateway.chain.build --check  # exit 1 if the committed artifact is stale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "TestUSDC.vy"
ARTIFACT = HERE / "TestUSDC.json"


def source_sha256(path: Path = SOURCE) -> str:
    """Hex sha256 of the contract source bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compile_contract(path: Path = SOURCE) -> dict[str, Any]:
    """Compile ``path`` with vyper in-process; return the artifact dict.

    Keys: ``contractName``, ``abi``, ``bytecode`` (0x-hex init code), ``vyperVersion``,
    ``sourceSha256``.
    """
    import vyper  # imported lazily: only the build and its test need the compiler

    source = path.read_text()
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    bytecode = out["bytecode"]
    if not bytecode.startswith("0x"):
        bytecode = "0x" + bytecode
    return {
        "contractName": path.stem,
        "abi": out["abi"],
        "bytecode": bytecode,
        "vyperVersion": vyper.__version__,
        "sourceSha256": source_sha256(path),
    }


def render(artifact: dict[str, Any]) -> str:
    """Serialize deterministically so a rebuild of the same source is byte-identical."""
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def load_artifact(path: Path = ARTIFACT) -> dict[str, Any]:
    """Load the committed artifact (no compiler needed)."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def is_stale(artifact_path: Path = ARTIFACT, source_path: Path = SOURCE) -> bool:
    """True when the artifact is missing or differs from a fresh compile of the source."""
    if not artifact_path.exists():
        return True
    return artifact_path.read_text() != render(compile_contract(source_path))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m gateway.chain.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed artifact is stale")
    args = parser.parse_args(argv)
    if args.check:
        if is_stale():
            print(f"{ARTIFACT.name} is stale: run python -m gateway.chain.build", file=sys.stderr)
            return 1
        print(f"{ARTIFACT.name} is up to date")
        return 0
    ARTIFACT.write_text(render(compile_contract()))
    print(f"wrote {ARTIFACT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
