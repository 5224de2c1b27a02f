"""Measure the ack path: the mirrorflow webhook against a bare Starlette app.

    python -m bench.ack [--quick] [--profile] [--on-disk]

Both apps run under uvicorn with the same settings and event loop (see
:mod:`bench.apps`), each alone with the same Temporal dev server beside it,
and each is loaded the same two ways:

- fixed concurrency: wrk with ``--connections`` open connections for
  ``--seconds``, every request a notification about an item of its own (so
  that each one makes the webhook start a new workflow);
- fixed offered rate: ``--rate`` requests per second, open loop, for
  ``--seconds``.

Then the raw ``client.start_workflow`` rate from Python, with ``--callers``
concurrent callers and the webhook's own arguments, against the same server:
the ceiling of the webhook's rate. No worker runs; the started workflows
wait on a task queue of their own. Needs wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from bench import load, profile
from bench.harness import (
    Child,
    Children,
    CpuMeter,
    add_bench_subscriber,
    mirrorflow_env,
    notification_body,
    raise_file_limit,
    results_folder,
    run_async,
    start_bare,
    start_temporal,
    start_webhook,
)
from bench.report import markdown_table, new_figure, ratio, save
from webhook.app import summarize
from workflows.models import (
    COLLECTION,
    ITEM_ID,
    OPERATION,
    USER_TOKEN,
    WORKFLOW_NAME,
    Notification,
    UserAction,
    sha256_hex,
    workflow_id_for,
)


@dataclass(frozen=True)
class Options:
    """How hard and how long to load each app."""

    connections: int
    rate: float
    seconds: float
    callers: int
    profile: bool
    on_disk: bool


def parse_options() -> Options:
    """Return the command line's options; ``--quick`` shortens every run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="3 s per run")
    parser.add_argument(
        "--profile", action="store_true", help="sample the webhook with py-spy"
    )
    parser.add_argument(
        "--on-disk",
        action="store_true",
        help="Temporal on SQLite with WAL, as `mirrorflow dev` runs it",
    )
    args = parser.parse_args()

    return Options(
        connections=args.connections,
        rate=args.rate,
        seconds=3.0 if args.quick else args.seconds,
        callers=args.callers,
        profile=args.profile,
        on_disk=args.on_disk,
    )


async def measure_app(
    name: str,
    url: str,
    server: Child,
    others: list[Child],
    options: Options,
    folder: Path,
) -> dict[str, Any]:
    """Load one app at fixed concurrency, then at a fixed rate."""
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"
    notify = url + "/notify"
    await asyncio.to_thread(
        load.run_wrk, notify, run_id=run_id + "-warm", connections=8, seconds=2
    )

    meter = CpuMeter([server, *others])
    recording = None
    if options.profile and name == "mirrorflow":
        raw = folder / "webhook.pyspy.txt"
        recording = profile.record(server.pid, raw, seconds=options.seconds - 1)
    meter.start()
    closed = await asyncio.to_thread(
        load.run_wrk,
        notify,
        run_id=run_id,
        connections=options.connections,
        seconds=options.seconds,
    )
    closed_cpu = meter.stop()
    profiled = None
    if recording is not None:
        profiled = profile.stop(recording, raw)
    server.check_alive()

    def bodies(number: int) -> tuple[bytes, str]:
        return notification_body(f"{run_id}-rate-{number}"), "fresh"

    meter.start()
    answers, seconds = await load.offer(
        notify, bodies, rate=options.rate, seconds=options.seconds
    )
    open_cpu = meter.stop()
    server.check_alive()

    return {
        "fixed_concurrency": {**closed.as_dict(), "cpu_percent": closed_cpu},
        "fixed_rate": {
            **load.summarize(answers, seconds).as_dict(),
            "offered_per_second": options.rate,
            "cpu_percent": open_cpu,
        },
        "profile": profiled.__dict__ if profiled else None,
    }


async def measure_starts(
    client: Client, task_queue: str, *, callers: int, seconds: float
) -> dict[str, Any]:
    """Start workflows from ``callers`` concurrent callers as the webhook does."""
    run_id = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    numbers = iter(range(100_000))
    began = time.perf_counter()
    stop = began + seconds

    async def caller() -> None:
        for number in numbers:
            if time.perf_counter() > stop:
                return
            notification = Notification(
                collection="timeline",
                item_id=f"raw-{run_id}-{number}",
                operation="UPDATE",
                user_token="bench-user",
                verify_token_sha256=sha256_hex("bench-verify-token"),
                user_actions=(UserAction(type="SHARE"),),
            )
            sent = time.perf_counter()
            await client.start_workflow(
                WORKFLOW_NAME,
                notification,
                id=workflow_id_for(notification),
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(USER_TOKEN, notification.user_token),
                        SearchAttributePair(ITEM_ID, notification.item_id),
                        SearchAttributePair(COLLECTION, notification.collection),
                        SearchAttributePair(OPERATION, notification.operation),
                    ]
                ),
                static_summary=summarize(notification),
                rpc_timeout=timedelta(seconds=10),
            )
            latencies.append(time.perf_counter() - sent)

    async with asyncio.TaskGroup() as group:
        for _ in range(callers):
            group.create_task(caller())
    elapsed = time.perf_counter() - began
    ordered = sorted(x * 1000 for x in latencies)

    return {
        "callers": callers,
        "starts": len(ordered),
        "seconds": round(elapsed, 2),
        "per_second": round(len(ordered) / elapsed, 1),
        "p50_ms": round(load.percentile(ordered, 50), 2),
        "p99_ms": round(load.percentile(ordered, 99), 2),
        "max_ms": round(ordered[-1], 2) if ordered else 0.0,
    }


async def run(options: Options) -> dict[str, Any]:
    """Start everything, measure both apps and the raw start rate."""
    raise_file_limit()
    with results_folder("ack") as folder, Children(folder) as children:
        temporal = await start_temporal(children, on_disk=options.on_disk)
        database = folder / "subscribers.db"
        add_bench_subscriber(database)
        task_queue = f"bench-ack-{uuid.uuid4().hex[:8]}"
        env = mirrorflow_env(
            temporal_address=temporal.address,
            temporal_task_queue=task_queue,
            database_url=f"sqlite:///{database}",
        )
        results: dict[str, Any] = {"options": options.__dict__}

        bare, bare_url = await start_bare(children)
        results["bare"] = await measure_app(
            "bare", bare_url, bare, [temporal.child], options, folder
        )
        children.stop(bare)

        webhook, url = await start_webhook(children, env)
        results["mirrorflow"] = await measure_app(
            "mirrorflow", url, webhook, [temporal.child], options, folder
        )
        children.stop(webhook)

        meter = CpuMeter([temporal.child])
        meter.start()
        results["start_workflow"] = await measure_starts(
            temporal.client,
            task_queue,
            callers=options.callers,
            seconds=options.seconds,
        )
        results["start_workflow"]["cpu_percent"] = meter.stop()

    return results


def report(results: dict[str, Any], options: Options) -> str:
    """Return the tables of one run."""
    rows = []
    for load_name, label in (
        ("fixed_concurrency", f"{options.connections} connections (wrk)"),
        ("fixed_rate", f"{options.rate:g} req/s offered"),
    ):
        base = results["bare"][load_name]
        for app in ("bare", "mirrorflow"):
            got = results[app][load_name]
            cpu = got["cpu_percent"]
            rows.append(
                [
                    label,
                    app,
                    got["per_second"],
                    got["p50_ms"],
                    got["p99_ms"],
                    got["max_ms"],
                    got["errors"],
                    ratio(got["per_second"], base["per_second"]),
                    ratio(got["p99_ms"], base["p99_ms"]),
                    f"{cpu.get(app if app == 'bare' else 'webhook', 0):.0f} / "
                    f"{cpu.get('temporal', 0):.0f}",
                ]
            )
    starts = results["start_workflow"]
    webhook_rate = results["mirrorflow"]["fixed_concurrency"]["per_second"]
    rows.append(
        [
            f"{starts['callers']} callers, Python",
            "start_workflow",
            starts["per_second"],
            starts["p50_ms"],
            starts["p99_ms"],
            starts["max_ms"],
            0,
            ratio(
                starts["per_second"], results["bare"]["fixed_concurrency"]["per_second"]
            ),
            None,
            f"- / {starts['cpu_percent'].get('temporal', 0):.0f}",
        ]
    )
    table = markdown_table(
        [
            "load",
            "app",
            "200/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
            "200/s ÷ bare",
            "p99 ÷ bare",
            "CPU % app / Temporal",
        ],
        rows,
    )
    ceiling = ratio(webhook_rate, starts["per_second"])
    lines = [
        table,
        "",
        f"webhook at {options.connections} connections ÷ raw start_workflow rate: "
        f"{ceiling}",
    ]
    profiled = results["mirrorflow"]["profile"]
    if profiled:
        lines += ["", _profile_table(profiled)]

    return "\n".join(lines)


def _profile_table(profiled: dict[str, Any]) -> str:
    by_code = markdown_table(
        ["webhook CPU spent in", "% of samples"], profiled["by_code"]
    )
    through = markdown_table(
        ["inside mirrorflow's function", "% of samples"], profiled["through"]
    )

    return f"{by_code}\n\n{through}"


def chart(results: dict[str, Any], options: Options) -> Any:
    """Draw throughput and latency of both apps side by side."""
    figure, (left, right) = new_figure(2)
    apps = ["bare", "mirrorflow"]
    rates = [results[app]["fixed_concurrency"]["per_second"] for app in apps]
    rates.append(results["start_workflow"]["per_second"])
    left.bar(["bare app", "mirrorflow webhook", "start_workflow\n(Python)"], rates)
    left.set_yscale("log")
    left.set_ylabel("answers (starts) per second, log scale")
    left.set_title(f"Throughput at {options.connections} connections")
    for index, value in enumerate(rates):
        left.annotate(f"{value:,.0f}", (index, value), ha="center", va="bottom")

    labels = ["p50", "p99", "max"]
    width = 0.2
    for offset, (app, load_name) in enumerate(
        [(app, name) for name in ("fixed_concurrency", "fixed_rate") for app in apps]
    ):
        got = results[app][load_name]
        values = [got["p50_ms"], got["p99_ms"], got["max_ms"]]
        positions = [i + (offset - 1.5) * width for i in range(3)]
        kind = "conc." if load_name == "fixed_concurrency" else f"{options.rate:g}/s"
        right.bar(positions, values, width, label=f"{app}, {kind}")
    right.set_xticks(range(3), labels)
    right.set_yscale("log")
    right.set_ylabel("ms, log scale")
    right.set_title("Ack latency")
    right.legend(fontsize=8)

    return figure


def main() -> None:
    """Run the benchmark and report it."""
    options = parse_options()
    results = run_async(run(options))
    text = report(results, options)
    print(text)
    save("ack", {**results, "table": text}, chart(results, options))


if __name__ == "__main__":
    main()
