"""Serve the Mirror emulator: ``python -m emulator --host H --port P``."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from collections.abc import Sequence

from emulator.config import EmulatorConfig
from emulator.server import DEFAULT_HOST, DEFAULT_PORT, create_server
from mirrorflow.logs import configure_logging


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Return the command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m emulator", description="Serve the Mirror API v1 emulator."
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks one")
    parser.add_argument(
        "--fd", type=int, help="serve on this inherited, listening socket instead"
    )
    parser.add_argument(
        "--public-url", help="base URL for links (default: the URL of each request)"
    )
    parser.add_argument(
        "--allow-http",
        action="store_true",
        help="accept http:// callback URLs on any host, not only loopback",
    )
    parser.add_argument("--token-lifetime", type=float, metavar="SECONDS")
    parser.add_argument("--delivery-timeout", type=float, metavar="SECONDS")
    parser.add_argument("--delivery-attempts", type=int, metavar="N")
    parser.add_argument("--delivery-backoff", type=float, metavar="SECONDS")
    parser.add_argument("--max-upload-bytes", type=int, metavar="N")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-format", default="auto", choices=["auto", "json", "console"]
    )
    parser.add_argument(
        "--stop-on-stdin-eof",
        action="store_true",
        help="stop when standard input closes (when the parent process is gone)",
    )

    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> EmulatorConfig:
    """Return the emulator settings the options ask for."""
    changes = {
        "public_url": args.public_url,
        "token_lifetime": args.token_lifetime,
        "delivery_timeout": args.delivery_timeout,
        "delivery_attempts": args.delivery_attempts,
        "delivery_backoff": args.delivery_backoff,
        "max_upload_bytes": args.max_upload_bytes,
    }
    config = EmulatorConfig(allow_http=args.allow_http)

    return config.updated({k: v for k, v in changes.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the emulator until interrupted."""
    args = parse_args(argv)
    try:
        config = config_from(args)
    except ValueError as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)

    server = create_server(
        config, host=args.host, port=args.port, log_level=args.log_level
    )
    if args.stop_on_stdin_eof:

        def stop_when_stdin_closes() -> None:
            sys.stdin.buffer.read()
            server.should_exit = True

        threading.Thread(target=stop_when_stdin_closes, daemon=True).start()

    sock = socket.socket(fileno=args.fd) if args.fd is not None else None
    server.run(sockets=[sock] if sock is not None else None)

    return 0


if __name__ == "__main__":
    sys.exit(main())
