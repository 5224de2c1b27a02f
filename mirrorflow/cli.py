"""The ``mirrorflow`` command: run each part, manage subscribers, replay runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from mirrorflow.errors import MirrorflowError
from mirrorflow.logs import configure_logging
from mirrorflow.settings import Settings, load_settings

log = structlog.get_logger("mirrorflow.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        status: int = args.run(args, settings)
    except MirrorflowError as exc:
        print(f"mirrorflow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrorflow",
        description="A durable push queue for Google Glass Mirror notifications.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="run everything on one machine")
    dev.add_argument("--data-dir", type=Path, default=Path("data"))
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--temporal-port", type=int, default=7233)
    dev.add_argument("--ui-port", type=int, default=8233)
    dev.add_argument("--emulator-port", type=int, default=8090)
    dev.add_argument("--webhook-port", type=int, default=8080)
    dev.set_defaults(run=_dev)

    webhook = commands.add_parser("webhook", help="serve the webhook")
    webhook.add_argument("--host", default="127.0.0.1")
    webhook.add_argument("--port", type=int, default=8080)
    webhook.set_defaults(run=_webhook)

    worker = commands.add_parser("worker", help="run a Temporal worker")
    worker.set_defaults(run=_worker)

    emulator = commands.add_parser(
        "emulator",
        help="serve the Mirror emulator",
        description="Serve the Mirror emulator. Options after --host and --port "
        "go to the emulator itself (see `python -m emulator --help`).",
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8090)
    emulator.add_argument("options", nargs=argparse.REMAINDER)
    emulator.set_defaults(run=_emulator)

    _subscribers_parser(commands)
    _replay_parser(commands)
    _demo_parser(commands)

    return parser


def _subscribers_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    subscribers = commands.add_parser("subscribers", help="manage subscribed users")
    actions = subscribers.add_subparsers(required=True, metavar="ACTION")

    add = actions.add_parser(
        "add", help="subscribe a user on Mirror and keep their credentials"
    )
    add.add_argument("--user-token", required=True)
    add.add_argument(
        "--credentials",
        type=Path,
        required=True,
        help="the user's OAuth grant, Google's authorized_user JSON",
    )
    add.set_defaults(run=_subscribers_add)

    listing = actions.add_parser("list", help="list subscribed users")
    listing.set_defaults(run=_subscribers_list)

    remove = actions.add_parser("remove", help="unsubscribe and forget a user")
    remove.add_argument("--user-token", required=True)
    remove.set_defaults(run=_subscribers_remove)


def _replay_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    replay = commands.add_parser(
        "replay", help="re-run failed, timed-out or terminated notification runs"
    )
    replay.add_argument(
        "--since", help="runs started this long ago or later: 24h, 30m, 7d or ISO 8601"
    )
    replay.add_argument("--until", help="runs started before this: same forms")
    replay.add_argument("--user-token", help="only this user's runs")
    replay.add_argument("--query", help="a raw visibility query, ANDed with the rest")
    replay.add_argument(
        "--dry-run", action="store_true", help="show what would run; start nothing"
    )
    replay.set_defaults(run=_replay)


def _demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser("demo", help="act as a Glass user on the emulator")
    actions = demo.add_subparsers(required=True, metavar="ACTION")
    share = actions.add_parser("share-photo", help="make the demo user share a photo")
    share.add_argument("--emulator", default="http://127.0.0.1:8090")
    share.add_argument("--user", default="demo")
    share.set_defaults(run=_demo_share_photo)


def _dev(args: argparse.Namespace, settings: Settings) -> int:
    from mirrorflow.dev import DevPorts, run_dev

    ports = DevPorts(
        host=args.host,
        temporal=args.temporal_port,
        ui=args.ui_port,
        emulator=args.emulator_port,
        webhook=args.webhook_port,
    )

    return run_dev(args.data_dir, ports)


def _webhook(args: argparse.Namespace, settings: Settings) -> int:
    from webhook.app import serve

    serve(settings, host=args.host, port=args.port)

    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker import run_worker

    asyncio.run(run_worker(settings))

    return 0


def _emulator(args: argparse.Namespace, settings: Settings) -> int:
    from emulator.__main__ import main as emulator_main

    options = ["--host", args.host, "--port", str(args.port), *args.options]

    return emulator_main(options)


def _subscribers_add(args: argparse.Namespace, settings: Settings) -> int:
    from mirrorflow.subscribing import add_subscriber

    try:
        credentials = json.loads(args.credentials.read_text())
    except (OSError, ValueError) as exc:
        raise MirrorflowError(
            f"Cannot read credentials from {str(args.credentials)!r}: {exc}. "
            "Expected the authorized_user JSON of the user's OAuth grant."
        ) from exc

    subscriber = add_subscriber(settings, args.user_token, credentials)
    print(
        f"Subscribed {subscriber.user_token!r} on {settings.mirror_root_url} "
        f"with callback {settings.callback_url}."
    )

    return 0


def _subscribers_list(args: argparse.Namespace, settings: Settings) -> int:
    from activities.subscribers import SubscriberStore

    for subscriber in SubscriberStore(settings.database_path).list():
        created = subscriber.created.isoformat() if subscriber.created else "-"
        has_token = "yes" if subscriber.verify_token_sha256 else "no"
        print(f"{subscriber.user_token}\tadded {created}\tverify token: {has_token}")

    return 0


def _subscribers_remove(args: argparse.Namespace, settings: Settings) -> int:
    from mirrorflow.subscribing import remove_subscriber

    if not remove_subscriber(settings, args.user_token):
        print(f"No subscriber has user token {args.user_token!r}.", file=sys.stderr)
        return 1
    print(f"Removed {args.user_token!r}.")

    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from mirrorflow.replay import parse_moment, replay_failed
    from mirrorflow.temporal import connect

    since = parse_moment(args.since) if args.since else None
    until = parse_moment(args.until) if args.until else None

    async def replay() -> int:
        summary = await replay_failed(
            await connect(settings),
            since=since,
            until=until,
            user_token=args.user_token,
            query=args.query,
            dry_run=args.dry_run,
            progress=sys.stderr,
        )
        print(summary.render())

        return 1 if summary.errors else 0

    return asyncio.run(replay())


def _demo_share_photo(args: argparse.Namespace, settings: Settings) -> int:
    from mirrorflow.demo import share_photo

    shared = share_photo(args.emulator, args.user)
    item = shared["item"]["id"]
    print(f"{args.user!r} shared item {item}; notifications sent:")
    for notification in shared["notifications"]:
        print(f"  {json.dumps(notification)}")

    return 0
