"""The ``tollstream`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gateway import accounts_cli, wallet_cli
from gateway.background import default_loop, freeze_startup_heap
from gateway.logs import configure as configure_logs
from gateway.settings import Settings, SettingsError
from gateway.summary import effective, models_table, rails, startup, version

log = logging.getLogger("tollstream")


def _serve(args: argparse.Namespace) -> int:
    """Run the gateway: one process, or ``--workers N`` under uvicorn's process manager.

    Why uvicorn's workers (not gunicorn, not N gateways behind a proxy): the parent binds the
    listening socket once and every worker accepts from it (one address, no proxy), it
    restarts a worker that dies and stops them all on SIGTERM/SIGINT, and it is already a
    dependency. Workers are *spawned* (fresh interpreters, not forks) and build their app from
    the factory :func:`gateway.app.worker_app`, so each has its own event loop, Redis pool,
    upstream pool and ledger owner id: every worker heartbeats and sweeps as a process of its
    own, and never sweeps a live sibling's holds (a dead one's come back after the
    reservation TTL, like any crashed process').

    With the embedded Redis this process starts the one Valkey, under the data directory's
    lock (a second gateway on the same directory is refused, exit 1), hands its URL to the
    workers, and stops it when the workers have stopped.
    """
    import uvicorn

    from gateway.app import WORKER_ENV, create_app
    from gateway.embedded import DataDirInUse, EmbeddedRedis

    try:
        settings = Settings.load(args.config)
    except SettingsError as exc:
        print(f"tollstream: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("tollstream: --workers must be at least 1", file=sys.stderr)
        return 2
    configure_logs(settings.log_format, args.log_level)
    raise_open_files_limit()
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(Path(settings.data_dir), port=settings.embedded_redis_port)
        try:
            redis_url = embedded.start()
        except DataDirInUse as exc:
            print(f"tollstream: {exc}", file=sys.stderr)
            return 1
    host, port = args.host or settings.host, args.port or settings.port
    for line in startup(settings, address=f"http://{host}:{port}", redis_url=redis_url,
                        embedded=embedded is not None, workers=args.workers,
                        loop=args.loop):
        print(f"tollstream: {line}", file=sys.stderr)
    options: dict[str, Any] = {
        "host": host, "port": port, "log_config": None,  # our handler (logs.py)
        "log_level": args.log_level, "timeout_graceful_shutdown": 5,
        "loop": args.loop, "http": "httptools"}
    # uvicorn re-raises a SIGTERM it shut down on, after restoring the handler it found: with
    # the default one the process would die there, before the finally below stops the
    # embedded Valkey (left running, holding the data directory). This one exits normally.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if args.workers == 1:
            app = create_app(settings, redis_url)
            freeze_startup_heap()
            uvicorn.run(app, **options)
        else:
            # What a spawned worker needs to build the same app (it inherits the
            # environment, so TOLLSTREAM_* overrides apply to it too).
            os.environ[WORKER_ENV] = json.dumps({"config": args.config, "redis_url": redis_url,
                                                 "log_level": args.log_level})
            uvicorn.run("gateway.app:worker_app", factory=True, workers=args.workers,
                        **options)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit and log both; return (before,
    after). Every stream holds a client socket and an upstream socket: the usual soft limit
    of 1,024 caps a worker near 500 streams while the hard limit is often far higher."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files: could not raise the soft limit %d to %d: %s", soft,
                        target, exc)
            return soft, soft
        log.info("open files: soft limit raised from %d to %d (the hard limit)", soft, target)
        return soft, target
    log.info("open files: limit %s (soft) / %s (hard)", _limit(soft), _limit(hard))
    return soft, soft


def _limit(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _config_check(args: argparse.Namespace) -> int:
    try:
        settings = Settings.load(args.config)
    except SettingsError as exc:
        print(f"tollstream: {exc}", file=sys.stderr)
        return 2
    print(effective(settings))
    print(f"rails: {rails(settings)}")
    print("\n".join(models_table(settings)))
    return 0


def _upstream_sim(args: argparse.Namespace) -> int:
    from gateway.simulator import SimConfig, serve

    pace = f"{args.tokens_per_second:g} tokens/s" if args.tokens_per_second else "burst"
    print(f"tollstream upstream-sim: the simulated model APIs (chat, responses, messages) on "
          f"http://{args.host}:{args.port}/v1, {pace}, {args.tokens_per_chunk} token(s) per "
          f"chunk, {'an API key required' if args.api_key else 'no API key'}",
          file=sys.stderr, flush=True)
    serve(args.host, args.port, SimConfig(tokens_per_second=args.tokens_per_second,
                                          tokens_per_chunk=args.tokens_per_chunk,
                                          api_key=args.api_key))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(deposit=args.deposit, prompt=args.prompt, rail=args.rail,
                    pause=args.pause)


def _chain(args: argparse.Namespace) -> int:
    from gateway.chain.devchain import run_chain_cli

    run_chain_cli(wallets=args.wallets, port=args.port)
    return 0


ENVIRONMENT = """Environment: every setting is also TOLLSTREAM_<KEY> (nested keys with __,
e.g. TOLLSTREAM_UPSTREAMS__SIM__API_KEY); TOLLSTREAM_CONFIG names the config file;
TOLLSTREAM_ADMIN_TOKEN turns the admin API on. Secrets a setting names by variable
(TOLLSTREAM_MPP_SECRET, TOLLSTREAM_STRIPE_SECRET_KEY, relayer_key_env, ...) are read from it.
See tollstream.example.toml for every key."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollstream",
                                     description="Streaming pay-per-token inference gateway")
    parser.add_argument("--version", action="version", version=f"tollstream {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    serve = sub.add_parser(
        "serve", help="run the gateway", formatter_class=defaults, epilog=ENVIRONMENT)
    serve.add_argument("--config", help="TOML config file (default: $TOLLSTREAM_CONFIG, "
                                        "else the built-in simulator config)")
    serve.add_argument("--host", help="listen address (default: the config's host)")
    serve.add_argument("--port", type=int, help="listen port (default: the config's port)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port and one Redis (with the "
                            "embedded Redis, this process runs it for all of them)")
    serve.add_argument("--loop", choices=["uvloop", "asyncio"], default=default_loop(),
                       help="the event loop (uvloop where it is installed: a dependency "
                            "except on Windows)")
    serve.set_defaults(func=_serve)

    config = sub.add_parser("config", help="check a configuration without starting anything")
    config_actions = config.add_subparsers(dest="config_action", required=True)
    check = config_actions.add_parser(
        "check", formatter_class=defaults, epilog=ENVIRONMENT,
        help="validate it, print the effective configuration (secrets masked) and the "
             "models with their prices; exit 2 naming the key on an error")
    check.add_argument("--config", help="TOML config file (default: $TOLLSTREAM_CONFIG, "
                                        "else the built-in simulator config)")
    check.set_defaults(func=_config_check)

    accounts_cli.add_parser(sub)

    sim = sub.add_parser("upstream-sim", help="run the simulated model API",
                         formatter_class=defaults)
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8401)
    sim.add_argument("--tokens-per-second", type=float, default=0.0,
                     help="pace of generation (0: as fast as possible)")
    sim.add_argument("--tokens-per-chunk", type=int, default=1)
    sim.add_argument("--api-key", default=None, help="require this upstream API key")
    sim.set_defaults(func=_upstream_sim)

    demo = sub.add_parser("demo", help="run the whole paid loop locally, in one command",
                          formatter_class=defaults)
    demo.add_argument("--deposit", default=None,
                      help="the x402 deposit the gateway asks for, or the MPP channel's "
                           "deposit, in USDC (default 0.0001 / 0.002)")
    demo.add_argument("--rail", choices=["x402", "mpp", "upto"], default="x402",
                      help="how the agent pays: x402 deposits, one MPP session, or x402 upto "
                           "authorizations settled to the token")
    demo.add_argument("--prompt", default="Tell me a long story about a toll bridge.")
    demo.add_argument("--pause", type=float, default=0.0,
                      help="seconds to wait between the steps, for people watching")
    demo.set_defaults(func=_demo)

    wallet_cli.add_parser(sub)

    chain = sub.add_parser("chain", help="run a local EVM chain with the test USDC token and "
                                         "the MPP session escrow", formatter_class=defaults)
    chain.add_argument("--wallets", type=int, default=3)
    chain.add_argument("--port", type=int, default=None)
    chain.set_defaults(func=_chain)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per upstream request is noise at INFO (and the demo prints its own story).
    for noisy in ("httpx", "httpx2", "web3", "x402"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
