"""Compile the project's contracts into committed artifacts: ``TestUSDC.vy`` (the EIP-3009 test
token) into ``TestUSDC.json``, ``Escrow.vy`` (the MPP session escrow) into ``Escrow.json``,
``Permit2.vy`` (Uniswap Permit2's signature transfers) into ``Permit2.json`` and
``X402UptoPermit2Proxy.vy`` (the x402 ``upto`` scheme's proxy) into
``X402UptoPermit2Proxy.json``.

The artifacts are committed so the gateway and its tests can deploy the contracts without
vyper installed; ``--check`` lets CI prove every artifact still matches its source.

Usage::

    python -m gateway.chain.build          # rebuild every artifact
    python -m gateway.chain.build --check  # exit 1 if any committed artifact is stale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: The contracts built, by name: ``<name>.vy`` compiles to ``<name>.json`` next to it.
CONTRACTS = ("TestUSDC", "Escrow", "Permit2", "X402UptoPermit2Proxy")
SOURCE = HERE / "TestUSDC.vy"
ARTIFACT = HERE / "TestUSDC.json"
ESCROW_SOURCE = HERE / "Escrow.vy"
ESCROW_ARTIFACT = HERE / "Escrow.json"
PERMIT2_ARTIFACT = HERE / "Permit2.json"
UPTO_PROXY_ARTIFACT = HERE / "X402UptoPermit2Proxy.json"


def paths(name: str) -> tuple[Path, Path]:
    """``(source, artifact)`` of the contract ``name`` (one of :data:`CONTRACTS`)."""
    if name not in CONTRACTS:
        raise ValueError(f"unknown contract {name!r}")
    return HERE / f"{name}.vy", HERE / f"{name}.json"


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


def stale_contracts() -> list[str]:
    """Names of the contracts whose committed artifact is missing or stale."""
    return [name for name in CONTRACTS if is_stale(paths(name)[1], paths(name)[0])]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m gateway.chain.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if a committed artifact is stale")
    args = parser.parse_args(argv)
    if args.check:
        status = 0
        for name in CONTRACTS:
            source, artifact = paths(name)
            if is_stale(artifact, source):
                print(f"{artifact.name} is stale: run python -m gateway.chain.build",
                      file=sys.stderr)
                status = 1
            else:
                print(f"{artifact.name} is up to date")
        return status
    for name in CONTRACTS:
        source, artifact = paths(name)
        artifact.write_text(render(compile_contract(source)))
        print(f"wrote {artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
