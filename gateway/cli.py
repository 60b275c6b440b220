"""The ``tollstream`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.settings import Settings, SettingsError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.embedded import EmbeddedRedis

    try:
        settings = Settings.load(args.config)
    except SettingsError as exc:
        print(f"tollstream: {exc}", file=sys.stderr)
        return 2
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(Path(settings.data_dir))
        redis_url = embedded.start()
        print(f"tollstream: embedded Redis at {redis_url}, data in {settings.data_dir}",
              file=sys.stderr)
    try:
        app = create_app(settings, redis_url)
        uvicorn.run(app, host=args.host or settings.host, port=args.port or settings.port,
                    log_level=args.log_level, timeout_graceful_shutdown=5,
                    # uvloop stalled burst streams under concurrency in our tests (see
                    # benchmarks/RESULTS.md); the standard loop with httptools is used.
                    loop="asyncio", http="httptools")
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _upstream_sim(args: argparse.Namespace) -> int:
    from gateway.simulator import SimConfig, serve

    serve(args.host, args.port, SimConfig(tokens_per_second=args.tokens_per_second,
                                          tokens_per_chunk=args.tokens_per_chunk,
                                          api_key=args.api_key))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(deposit=args.deposit, prompt=args.prompt)


def _chain(args: argparse.Namespace) -> int:
    from gateway.chain.devchain import run_chain_cli

    run_chain_cli(wallets=args.wallets, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollstream",
                                     description="Streaming pay-per-token inference gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML config file (default: $TOLLSTREAM_CONFIG, "
                                        "else the built-in simulator config)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    sim = sub.add_parser("upstream-sim", help="run the simulated model API")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8401)
    sim.add_argument("--tokens-per-second", type=float, default=0.0,
                     help="pace of generation (0: as fast as possible)")
    sim.add_argument("--tokens-per-chunk", type=int, default=1)
    sim.add_argument("--api-key", default=None, help="require this upstream API key")
    sim.set_defaults(func=_upstream_sim)

    demo = sub.add_parser("demo", help="run the whole paid loop locally, in one command")
    demo.add_argument("--deposit", default="0.0001",
                      help="the x402 deposit the gateway asks for, in USDC (default 0.0001)")
    demo.add_argument("--prompt", default="Tell me a long story about a toll bridge.")
    demo.set_defaults(func=_demo)

    chain = sub.add_parser("chain", help="run a local EVM chain with the test USDC token")
    chain.add_argument("--wallets", type=int, default=3)
    chain.add_argument("--port", type=int, default=None)
    chain.set_defaults(func=_chain)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per upstream request is noise at INFO (and the demo prints its own story).
    for noisy in ("httpx", "httpx2", "web3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
