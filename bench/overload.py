"""Overload the webhook: ten times what it can start per second, for 30 s.

    python -m bench.overload [--quick] [--factor 10] [--seconds 30]
        [--intake direct|log] [--max-starts-in-flight N] [--on-disk]

First the webhook's own capacity is measured in the same run: 64 concurrent
senders for a few seconds, every notification about an item of its own;
its rate of 200s is what the pipeline can start per second (the baseline).
Then notifications are offered open loop at ``--factor`` times that rate for
``--seconds``, each about an item of its own, and every answer is kept.

Afterwards every run on the webhook's task queue is listed. Each
notification answered 200 must have its workflow (a 200 promises that
Temporal has it); notifications answered otherwise may or may not have one
(the start can reach Temporal after the webhook gave up waiting), which is
harmless because Mirror resends them and a resend folds into the run. No
worker runs: the benchmark is about acknowledging, not processing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from temporalio.client import Client

from bench import load
from bench.harness import (
    Children,
    CpuMeter,
    add_bench_subscriber,
    mirrorflow_env,
    notification_body,
    raise_file_limit,
    results_folder,
    run_async,
    start_temporal,
    start_webhook,
)
from bench.report import markdown_table, new_figure, ratio, save
from webhook.notifications import parse_notification
from workflows.models import workflow_id_for


@dataclass(frozen=True)
class Options:
    """How far beyond capacity, for how long, and how the webhook is set up."""

    factor: float
    seconds: float
    capacity_seconds: float
    on_disk: bool
    intake: str
    max_starts_in_flight: int | None


def parse_options() -> Options:
    """Return the command line's options; ``--quick`` runs 5 s at the factor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="5 s of overload")
    parser.add_argument(
        "--on-disk",
        action="store_true",
        help="Temporal on SQLite with WAL, as `mirrorflow dev` runs it",
    )
    parser.add_argument(
        "--intake",
        choices=("direct", "log"),
        default="direct",
        help="the webhook's MIRRORFLOW_INTAKE (default direct)",
    )
    parser.add_argument(
        "--max-starts-in-flight",
        type=int,
        default=None,
        help="the webhook's MIRRORFLOW_MAX_STARTS_IN_FLIGHT (default: its own)",
    )
    args = parser.parse_args()

    return Options(
        factor=args.factor,
        seconds=5.0 if args.quick else args.seconds,
        capacity_seconds=3.0 if args.quick else 8.0,
        on_disk=args.on_disk,
        intake=args.intake,
        max_starts_in_flight=args.max_starts_in_flight,
    )


async def wait_until_forwarded(url: str, within: float = 900) -> None:
    """Wait until the webhook's intake log holds nothing Temporal has not taken."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            ready = (await http.get("/readyz")).json()
            if ready["intake"]["backlog"] == 0:
                return
            await asyncio.sleep(1)


async def started_ids(client: Client, task_queue: str) -> set[str]:
    """Return the workflow ids of every run on the task queue, once counts settle."""
    query = f"TaskQueue = '{task_queue}'"
    previous = -1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        count = (await client.count_workflows(query)).count
        if count == previous:
            break
        previous = count
        await asyncio.sleep(2)

    return {execution.id async for execution in client.list_workflows(query)}


async def run(options: Options) -> dict[str, Any]:
    """Measure capacity, then overload the webhook and check what it promised."""
    raise_file_limit()
    with results_folder("overload") as folder, Children(folder) as children:
        temporal = await start_temporal(children, on_disk=options.on_disk)
        database = folder / "subscribers.db"
        add_bench_subscriber(database)
        task_queue = f"bench-overload-{uuid.uuid4().hex[:8]}"
        env = mirrorflow_env(
            temporal_address=temporal.address,
            temporal_task_queue=task_queue,
            database_url=f"sqlite:///{database}",
            intake=options.intake,
            intake_path=str(folder / f"intake-{task_queue}.db"),
        )
        if options.max_starts_in_flight is not None:
            env["MIRRORFLOW_MAX_STARTS_IN_FLIGHT"] = str(options.max_starts_in_flight)
        webhook, url = await start_webhook(children, env)
        notify = url + "/notify"
        run_id = uuid.uuid4().hex[:8]

        def capacity_bodies(number: int) -> tuple[bytes, str]:
            item_id = f"{run_id}-capacity-{number}"
            return notification_body(item_id), item_id

        answers, seconds = await load.drive(
            notify,
            capacity_bodies,
            concurrency=64,
            count=100_000,
            seconds=options.capacity_seconds,
        )
        capacity = load.summarize(answers, seconds)
        rate = max(1.0, options.factor * capacity.per_second)

        def bodies(number: int) -> tuple[bytes, str]:
            item_id = f"{run_id}-overload-{number}"
            return notification_body(item_id), item_id

        meter = CpuMeter([webhook, temporal.child])
        meter.start()
        answers, seconds = await load.offer(
            notify, bodies, rate=rate, seconds=options.seconds, max_in_flight=20_000
        )
        cpu = meter.stop()
        webhook.check_alive()
        overload = load.summarize(answers, seconds)

        if options.intake == "log":
            await wait_until_forwarded(url)
        started = await started_ids(temporal.client, task_queue)
        acked = {_workflow_id(a.tag) for a in answers if a.status == 200}
        refused = {_workflow_id(a.tag) for a in answers if a.status != 200}
        promised = {
            json.loads(a.body)["workflow_id"] for a in answers if a.status == 200
        }

    return {
        "options": options.__dict__,
        "capacity": capacity.as_dict(),
        "offered_per_second": round(rate, 1),
        "overload": {**overload.as_dict(), "cpu_percent": cpu},
        "by_status": _latency_by_status(answers),
        "acknowledged": len(acked),
        "acknowledged_with_workflow": len(acked & started),
        "acknowledged_ids_match_answers": promised == acked,
        "refused_with_workflow": len(refused & started),
        "timeline": [
            [round(a.due, 3), round(a.latency * 1000, 1), a.status] for a in answers
        ],
    }


def _workflow_id(item_id: str) -> str:
    """Return the workflow id the webhook derives for a notification's item."""
    return workflow_id_for(parse_notification(notification_body(item_id)))


def _latency_by_status(answers: list[load.Answer]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[load.Answer]] = {}
    for answer in answers:
        groups.setdefault(str(answer.status or "no answer"), []).append(answer)

    result = {}
    for status, group in sorted(groups.items()):
        ordered = sorted(a.latency * 1000 for a in group)
        result[status] = {
            "count": len(group),
            "p50_ms": round(load.percentile(ordered, 50), 1),
            "p99_ms": round(load.percentile(ordered, 99), 1),
            "max_ms": round(ordered[-1], 1),
        }

    return result


def report(results: dict[str, Any]) -> str:
    """Return the tables of one run."""
    capacity = results["capacity"]
    got = results["overload"]
    head = markdown_table(
        ["phase", "offered/s", "200/s", "÷ capacity", "p50 ms", "p99 ms", "max ms"],
        [
            [
                "capacity (64 senders)",
                None,
                capacity["per_second"],
                1.0,
                capacity["p50_ms"],
                capacity["p99_ms"],
                capacity["max_ms"],
            ],
            [
                f"overload ({results['options']['seconds']:g} s)",
                results["offered_per_second"],
                got["per_second"],
                ratio(got["per_second"], capacity["per_second"]),
                got["p50_ms"],
                got["p99_ms"],
                got["max_ms"],
            ],
        ],
    )
    statuses = markdown_table(
        ["answer", "count", "p50 ms", "p99 ms", "max ms"],
        [
            [status, g["count"], g["p50_ms"], g["p99_ms"], g["max_ms"]]
            for status, g in results["by_status"].items()
        ],
    )
    cpu = got["cpu_percent"]
    check = (
        f"acknowledged (200): {results['acknowledged']:,}; of those with a "
        f"workflow: {results['acknowledged_with_workflow']:,}; refused but "
        f"started anyway: {results['refused_with_workflow']:,}. CPU during "
        f"the overload, % of one core: webhook {cpu.get('webhook', 0):.0f}, "
        f"Temporal {cpu.get('temporal', 0):.0f}, load generator "
        f"{cpu.get('bench', 0):.0f}."
    )

    options = results["options"]
    setup = f"Webhook: intake {options['intake']}, max starts in flight " + (
        "default"
        if options["max_starts_in_flight"] is None
        else f"{options['max_starts_in_flight']:,}"
    )

    return f"{setup}.\n\n{head}\n\n{statuses}\n\n{check}"


def chart(results: dict[str, Any]) -> Any:
    """Draw each answer's latency over the run, by status."""
    figure, axes = new_figure(1, width=9)
    by_status: dict[int, tuple[list[float], list[float]]] = {}
    for due, latency, status in results["timeline"]:
        xs, ys = by_status.setdefault(status, ([], []))
        xs.append(due)
        ys.append(latency)
    for status, (xs, ys) in sorted(by_status.items()):
        label = f"{status or 'no answer'} ({len(xs):,})"
        axes.scatter(xs, ys, s=2, alpha=0.4, label=label)
    axes.set_yscale("log")
    axes.set_xlabel("seconds into the overload (when each request was due)")
    axes.set_ylabel("ack latency, ms (log scale)")
    axes.set_title(
        f"{results['offered_per_second']:,.0f} req/s offered, "
        f"{results['options']['factor']:g}x capacity"
    )
    axes.legend(markerscale=5)

    return figure


def main() -> None:
    """Run the benchmark and report it."""
    options = parse_options()
    results = run_async(run(options))
    text = report(results)
    print(text)
    statuses = Counter(str(s) for _, _, s in results["timeline"])
    print(f"statuses: {dict(statuses)}")
    save("overload", {**results, "table": text}, chart(results))


if __name__ == "__main__":
    main()
