"""Measure the log webhook's ack tail at a steady rate, by forward concurrency.

On one in-memory dev server with no worker, log webhooks that differ only in
``MIRRORFLOW_INTAKE_FORWARD_CONCURRENCY`` take turns: each is started fresh,
warmed up, offered ``--rate`` fresh notifications per second for
``--seconds`` (open loop), then left to forward all of them. A turn reports
its answer latencies and how long forwarding took; ``0`` stands for a
webhook whose Temporal is out of reach, so that nothing is forwarded. Turns
alternate because this machine's speed drifts within minutes.

    python -m bench.intake_tail --concurrency 32,1,0 --rounds 3
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
    Children,
    add_bench_subscriber,
    free_port,
    mirrorflow_env,
    raise_file_limit,
    results_folder,
    run_async,
    start_temporal,
    start_webhook,
)
from bench.intake import drain, offer, warm_up
from bench.report import Cell, markdown_table, save


def parse_options() -> argparse.Namespace:
    """Return the command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency",
        default="32,1",
        help="forward concurrencies to compare, comma-separated; 0: no Temporal",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=1000.0)

    return parser.parse_args()


async def turn(
    children: Children,
    folder: Path,
    temporal_address: str,
    concurrency: int,
    options: argparse.Namespace,
) -> dict[str, Any]:
    """Start a log webhook, offer it the rate, wait until it forwarded all."""
    database = folder / f"subscribers-{uuid.uuid4().hex[:8]}.db"
    add_bench_subscriber(database)
    env = mirrorflow_env(
        temporal_address=temporal_address if concurrency else f"{HOST}:{free_port()}",
        temporal_task_queue=f"bench-tail-{uuid.uuid4().hex[:8]}",
        database_url=f"sqlite:///{database}",
        intake="log",
        intake_path=str(folder / f"intake-{uuid.uuid4().hex[:8]}.db"),
        intake_forward_concurrency=str(max(concurrency, 1)),
    )
    webhook, url = await start_webhook(children, env, name=f"webhook-c{concurrency}")
    await warm_up(url)
    if concurrency:
        await drain(url)
    summary = await offer(url, uuid.uuid4().hex[:8], options.rate, options.seconds)
    began = time.monotonic()
    if concurrency:
        await drain(url)
    webhook.check_alive()
    children.stop(webhook)
    summary.pop("acked")

    return {
        **summary,
        "concurrency": concurrency,
        "forward_seconds": round(time.monotonic() - began, 1) if concurrency else None,
    }


async def run(options: argparse.Namespace) -> dict[str, Any]:
    """Take the turns; return them."""
    raise_file_limit()
    concurrencies = [int(value) for value in options.concurrency.split(",")]
    turns: list[dict[str, Any]] = []
    with results_folder("intake-tail") as folder, Children(folder) as children:
        temporal = await start_temporal(children, on_disk=False)
        for number in range(1, options.rounds + 1):
            for concurrency in concurrencies:
                result = await turn(
                    children, folder, temporal.address, concurrency, options
                )
                turns.append({"round": number, **result})
                print(
                    f"round {number}, concurrency {concurrency}: "
                    f"p99 {result['p99_ms']} ms",
                    flush=True,
                )

    return {"options": vars(options), "turns": turns}


def report(results: dict[str, Any]) -> str:
    """Return a table of the turns and the median p99 of each concurrency."""
    rows: list[list[Cell]] = [
        [
            t["round"],
            t["concurrency"] or "none (no Temporal)",
            t["p50_ms"],
            t["p90_ms"],
            t["p99_ms"],
            t["max_ms"],
            t["errors"],
            t["forward_seconds"],
        ]
        for t in results["turns"]
    ]
    table = markdown_table(
        [
            "round",
            "forward concurrency",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "non-200",
            "forwarded in s",
        ],
        rows,
    )
    medians = []
    for concurrency in dict.fromkeys(t["concurrency"] for t in results["turns"]):
        p99s = [
            t["p99_ms"] for t in results["turns"] if t["concurrency"] == concurrency
        ]
        medians.append(
            f"concurrency {concurrency}: median p99 {statistics.median(p99s)} ms"
        )

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
