"""`tokenmill gateway --config gateway.yaml [--host H] [--port P]`: run the gateway.

A bad or missing config, an unset `api_key_env` variable or an unreachable
database ends the command with one line naming the problem and exit status 2.
SIGTERM stops accepting, lets the requests in flight finish (up to the
config's `drain_timeout_s`), writes every ledger row and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import signal


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the gateway's YAML config (see "
                        "deploy/gateway/gateway.example.yaml and docs/gateway.md)")
    parser.add_argument("--host", default=None, help="address to listen on (default: the config's listen.host)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: the config's "
                        "listen.port)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="log level")


def run_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.gateway.config import load_config
    from tokenmill.gateway.store import DatabaseError

    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    config = load_config(args.config)
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    try:
        from tokenmill.gateway.app import build_gateway_app

        app = build_gateway_app(config)
    except DatabaseError as error:
        raise ValueError(str(error)) from None
    server_config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level,
                                   timeout_graceful_shutdown=config.drain_timeout_s, access_log=False, lifespan="on")
    server_config.load()  # imports uvicorn's protocol modules now, so that they are part of the start-up heap
    server = uvicorn.Server(server_config)
    aliases = ", ".join(config.aliases)
    print(f"tokenmill gateway: {len(config.pools)} pool(s), models {aliases}; listening on http://{host}:{port}",
          flush=True)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler that
    # was installed before it started; a no-op one lets a drained gateway exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    freeze_startup_heap()
    server.run()
    return 0 if server.started else 1


def freeze_startup_heap() -> None:
    """Keep the objects start-up made (modules, config, ORM metadata: about 125,000) out of every
    later garbage collection, which otherwise walks all of them each time while the event loop, and
    every stream on it, waits."""
    gc.collect()
    gc.freeze()
