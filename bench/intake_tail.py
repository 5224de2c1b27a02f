"""Measure the log webhook's ack tail at a steady rate, by forward concurrency.

On an in-memory dev server with no worker, started afresh for each round,
log webhooks that differ only in ``MIRRORFLOW_INTAKE_FORWARD_CONCURRENCY``
(and, written ``32@50``, in ``MIRRORFLOW_INTAKE_FORWARD_RATE``) take turns:
each is started fresh, warmed up, offered ``--rate`` fresh notifications per
second for ``--seconds`` (open loop), then left to forward all of them. A
turn reports its answer latencies, how long forwarding took, the CPU each
process used while offered, and the CPU time the hypervisor gave to other
guests ("stolen"). ``0`` stands for a webhook whose Temporal is out of
reach, so that nothing is forwarded, and ``bare`` for the bare Starlette app
(:mod:`bench.apps`): what this machine does at the same rate with no
mirrorflow code at all. Turns alternate because this machine's speed drifts
within minutes.

Suffixes change where things run for a turn:

- ``+pin``: the webhook's threads on the first CPU, and every other process
  of the benchmark (the dev server, the load generator) on the rest: the
  webhook with a core of its own, as on a machine it does not share with
  Temporal.
- ``+one``: the webhook's threads on the first CPU, everything else free to
  run on any CPU, that one included.
- ``+nice``: the dev server at niceness 10, below the webhook and the load
  generator.

    python -m bench.intake_tail --concurrency 32,0,bare --rounds 5
    python -m bench.intake_tail --concurrency 32,32+pin --rounds 4
    python -m bench.intake_tail --concurrency 32,32@50,0 --rounds 4
    python -m bench.intake_tail --concurrency 32,32+nice,bare --rounds 5
    python -m bench.intake_tail --concurrency 32,32+one,32+pin --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import (
    HOST,
    Child,
    Children,
    CpuMeter,
    Temporal,
    add_bench_subscriber,
    free_port,
    mirrorflow_env,
    nice_threads,
    pin_threads,
    raise_file_limit,
    results_folder,
    run_async,
    share_cpus,
    start_bare,
    start_temporal,
    start_webhook,
)
from bench.intake import drain, offer, warm_up
from bench.report import Cell, markdown_table, save

FLAGS = {"pin", "nice", "one"}
"""What may follow a turn's concurrency after a ``+``."""

NICENESS = 10
"""The dev server's niceness in ``+nice`` turns."""


def parse_options() -> argparse.Namespace:
    """Return the command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency",
        default="32,1",
        help=(
            "turns to compare, comma-separated: a forward concurrency (0: no "
            "Temporal), 32@50 for at most 50 starts per second, 32+pin for the "
            "webhook on a core of its own, 32+one for its threads on one CPU "
            "that others share, 32+nice for the dev server at "
            f"niceness {NICENESS}, bare for the bare app"
        ),
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=1000.0)

    options = parser.parse_args()
    for variant in options.concurrency.split(","):
        if variant != "bare":
            try:
                parse_variant(variant)
            except ValueError as exc:
                parser.error(str(exc))

    return options


def parse_variant(variant: str) -> tuple[int, str, set[str]]:
    """Return a turn's forward concurrency, its rate (or "") and its flags.

    Raises:
        ValueError: the variant is not written as the help says.
    """
    spec, *flags = variant.split("+")
    concurrency, _, rate = spec.partition("@")
    if not concurrency.isdigit() or set(flags) - FLAGS:
        raise ValueError(
            f"turn {variant!r}: write a concurrency, then @ and a rate, "
            "+pin, +one or +nice if wanted (or 'bare')"
        )

    return int(concurrency), rate, set(flags)


async def turn(
    children: Children,
    folder: Path,
    temporal: Temporal,
    variant: str,
    options: argparse.Namespace,
) -> dict[str, Any]:
    """Start a log webhook, offer it the rate, wait until it forwarded all."""
    if variant == "bare":
        return await bare_turn(children, temporal, options)
    concurrency, rate, flags = parse_variant(variant)
    database = folder / f"subscribers-{uuid.uuid4().hex[:8]}.db"
    add_bench_subscriber(database)
    env = mirrorflow_env(
        temporal_address=temporal.address if concurrency else f"{HOST}:{free_port()}",
        temporal_task_queue=f"bench-tail-{uuid.uuid4().hex[:8]}",
        database_url=f"sqlite:///{database}",
        intake="log",
        intake_path=str(folder / f"intake-{uuid.uuid4().hex[:8]}.db"),
        intake_forward_concurrency=str(max(concurrency, 1)),
    )
    if rate:
        env["MIRRORFLOW_INTAKE_FORWARD_RATE"] = rate
    webhook, url = await start_webhook(children, env, name="webhook")
    share_cpus(webhook, [temporal.child], own_core="pin" in flags)
    if "one" in flags:
        pin_threads(webhook.pid, {0})
    await warm_up(url)
    if concurrency:
        await drain(url, [webhook, temporal.child])
    nice_threads(temporal.child.pid, NICENESS if "nice" in flags else 0)
    try:
        summary = await offered(webhook, url, temporal, options)
        began = time.monotonic()
        if concurrency:
            await drain(url, [webhook, temporal.child])
    finally:
        nice_threads(temporal.child.pid, 0)
    webhook.check_alive()
    children.stop(webhook)
    suffix = "".join(f"+{flag}" for flag in sorted(flags))

    return {
        **summary,
        "variant": variant if concurrency else f"none (no Temporal){suffix}",
        "forward_seconds": round(time.monotonic() - began, 1) if concurrency else None,
    }


async def bare_turn(
    children: Children, temporal: Temporal, options: argparse.Namespace
) -> dict[str, Any]:
    """Offer the bare app the rate, with the dev server idle beside it."""
    app, url = await start_bare(children, name="webhook")
    share_cpus(app, [temporal.child], own_core=False)
    await warm_up(url)
    summary = await offered(app, url, temporal, options)
    app.check_alive()
    children.stop(app)

    return {**summary, "variant": "bare app", "forward_seconds": None}


async def offered(
    app: Child, url: str, temporal: Temporal, options: argparse.Namespace
) -> dict[str, Any]:
    """Offer the rate; return the answers' summary and the CPU it took."""
    meter = CpuMeter([app, temporal.child])
    meter.start()
    summary = await offer(url, uuid.uuid4().hex[:8], options.rate, options.seconds)
    summary["cpu_percent"] = meter.stop()
    summary["stolen_percent"] = meter.stolen_percent()
    summary.pop("acked")

    return summary


async def run(options: argparse.Namespace) -> dict[str, Any]:
    """Take the turns; return them."""
    raise_file_limit()
    variants = options.concurrency.split(",")
    turns: list[dict[str, Any]] = []
    with results_folder("intake-tail") as folder, Children(folder) as children:
        for number in range(1, options.rounds + 1):
            # A fresh server each round: every round starts from the same
            # state, and the in-memory one fails with "out of memory" after
            # about 70,000 workflows.
            temporal = await start_temporal(children, on_disk=False)
            for variant in variants:
                result = await turn(children, folder, temporal, variant, options)
                turns.append({"round": number, **result})
                print(
                    f"round {number}, {result['variant']}: p99 {result['p99_ms']} ms",
                    flush=True,
                )
            children.stop(temporal.child)

    return {"options": vars(options), "turns": turns}


def report(results: dict[str, Any]) -> str:
    """Return a table of the turns and the median p99 of each concurrency."""
    rows: list[list[Cell]] = [
        [
            t["round"],
            t["variant"],
            t["p50_ms"],
            t["p90_ms"],
            t["p99_ms"],
            t["max_ms"],
            t["errors"],
            t["forward_seconds"],
            t["cpu_percent"]["webhook"],
            t["cpu_percent"]["temporal"],
            t["cpu_percent"]["bench"],
            t["stolen_percent"],
        ]
        for t in results["turns"]
    ]
    table = markdown_table(
        [
            "round",
            "turn",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "non-200",
            "forwarded in s",
            "webhook CPU %",
            "Temporal CPU %",
            "load CPU %",
            "stolen %",
        ],
        rows,
    )
    medians = []
    for variant in dict.fromkeys(t["variant"] for t in results["turns"]):
        p99s = [t["p99_ms"] for t in results["turns"] if t["variant"] == variant]
        medians.append(f"{variant}: median p99 {statistics.median(p99s):.1f} ms")

    return table + "\n\n" + "; ".join(medians) + "."


def main() -> None:
    """Run the benchmark and print its table."""
    options = parse_options()
    results = run_async(run(options))
    text = report(results)
    print(text)
    save("intake-tail", {**results, "table": text})


if __name__ == "__main__":
    main()
