"""Measure the whole pipeline against a no-op workflow on the same worker settings.

    python -m bench.pipeline [--quick] [--count N] [--size BYTES] [--profile]

The pipeline: ``--count`` photos shared on the Mirror emulator, each
delivered by the emulator to ``mirrorflow webhook``, started as a
``NotificationWorkflow`` on Temporal, run by ``mirrorflow worker`` (verify,
fetch_item, fetch_attachment, store into a local folder). The clock runs
from the first share to the last completed run.

The baseline: the same number of :class:`bench.noop.NoopWorkflow` runs
(four activities that do nothing), started from Python with 50 concurrent
callers and run by a worker process with the same settings, on the same
Temporal dev server. Each side gets a warm-up run first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench import profile
from bench.harness import (
    Child,
    Children,
    CpuMeter,
    mirrorflow_env,
    results_folder,
    run_async,
    start_temporal,
    start_webhook,
    start_worker,
    wait_for_log,
)
from bench.noop import NOOP_WORKFLOW
from bench.report import markdown_table, new_figure, ratio, save
from emulator.testing import EmulatorAdmin, EmulatorProcess, EmulatorUser
from mirrorflow.settings import load_settings
from mirrorflow.subscribing import add_subscriber
from workflows.models import Notification, UserAction

CALLERS = 50


@dataclass(frozen=True)
class Options:
    """How many runs, how large each photo, whether to profile the worker."""

    count: int
    size: int
    profile: bool
    on_disk: bool


def parse_options() -> Options:
    """Return the command line's options; ``--quick`` runs 20 of each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=100_000, help="photo bytes")
    parser.add_argument("--quick", action="store_true", help="20 runs of each")
    parser.add_argument(
        "--profile", action="store_true", help="sample the worker with py-spy"
    )
    parser.add_argument(
        "--on-disk",
        action="store_true",
        help="Temporal on SQLite with WAL, as `mirrorflow dev` runs it",
    )
    args = parser.parse_args()

    return Options(
        count=20 if args.quick else args.count,
        size=args.size,
        profile=args.profile,
        on_disk=args.on_disk,
    )


async def wait_for_completed(
    client: Client, task_queue: str, count: int, *, within: float
) -> float:
    """Wait until ``count`` runs on the task queue closed; return when, or fail."""
    deadline = time.perf_counter() + within
    query = f"TaskQueue = '{task_queue}' AND ExecutionStatus != 'Running'"
    while True:
        closed = (await client.count_workflows(query)).count
        if closed >= count:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(
                f"Only {closed} of {count} runs on {task_queue} closed in {within:g} s."
            )
        await asyncio.sleep(0.25)


async def count_by_status(client: Client, task_queue: str) -> dict[str, int]:
    """Return how many runs on the task queue ended in each status."""
    counts: dict[str, int] = {}
    for status in ("Completed", "Failed", "Running", "TimedOut", "Terminated"):
        query = f"TaskQueue = '{task_queue}' AND ExecutionStatus = '{status}'"
        counts[status] = (await client.count_workflows(query)).count

    return counts


async def measure_noop(
    client: Client, children: Children, env: dict[str, str], options: Options
) -> dict[str, Any]:
    """Run ``count`` no-op workflows through a worker; time them."""
    task_queue = env["MIRRORFLOW_TEMPORAL_TASK_QUEUE"]
    worker = start_worker(children, env, name="noop-worker", module="bench.noop")
    await wait_for_log(worker, "noop_worker_started")
    run_id = uuid.uuid4().hex[:8]

    async def start(number: int) -> None:
        notification = Notification(
            collection="timeline",
            item_id=f"noop-{run_id}-{number}",
            operation="UPDATE",
            user_token="bench-user",
            user_actions=(UserAction(type="SHARE"),),
        )
        await client.start_workflow(
            NOOP_WORKFLOW,
            notification,
            id=f"noop-{run_id}-{number}",
            task_queue=task_queue,
        )

    await start(-1)
    await wait_for_completed(client, task_queue, 1, within=60)

    meter = CpuMeter([worker, *_servers(children)])
    meter.start()
    began = time.perf_counter()
    numbers = iter(range(options.count))

    async def caller() -> None:
        for number in numbers:
            await start(number)

    async with asyncio.TaskGroup() as group:
        for _ in range(CALLERS):
            group.create_task(caller())
    ended = await wait_for_completed(
        client, task_queue, options.count + 1, within=30 + options.count
    )
    meter.stop()
    children.stop(worker)

    return _outcome(
        options.count, ended - began, meter, await count_by_status(client, task_queue)
    )


async def measure_pipeline(
    client: Client,
    children: Children,
    env: dict[str, str],
    emulator: EmulatorAdmin,
    user: EmulatorUser,
    options: Options,
    folder: Path,
) -> dict[str, Any]:
    """Share ``count`` photos on the emulator and time them until stored."""
    task_queue = env["MIRRORFLOW_TEMPORAL_TASK_QUEUE"]
    worker = start_worker(children, env)
    await wait_for_log(worker, "worker_started")
    photo = os.urandom(options.size)

    await asyncio.to_thread(emulator.share, user, photo)
    await wait_for_completed(client, task_queue, 1, within=60)

    meter = CpuMeter([worker, *_servers(children)])
    recording = None
    if options.profile:
        recording = profile.record(worker.pid, folder / "worker.pyspy.txt")
    meter.start()
    began = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        shares = [
            asyncio.wrap_future(pool.submit(emulator.share, user, photo))
            for _ in range(options.count)
        ]
        await asyncio.gather(*shares)
    ended = await wait_for_completed(
        client, task_queue, options.count + 1, within=60 + options.count
    )
    meter.stop()
    profiled = None
    if recording is not None:
        profiled = profile.stop(recording, folder / "worker.pyspy.txt")
    children.stop(worker)

    deliveries = emulator.deliveries(user=user)
    outcome = _outcome(
        options.count, ended - began, meter, await count_by_status(client, task_queue)
    )
    outcome["delivery_statuses"] = _tally(str(d["statusCode"]) for d in deliveries)
    outcome["profile"] = profiled.__dict__ if profiled else None

    return outcome


def _servers(children: Children) -> list[Child]:
    names = ("temporal", "webhook", "emulator")

    return [child for child in children.started if child.name in names]


def _tally(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1

    return counts


def _outcome(
    count: int, seconds: float, meter: CpuMeter, statuses: dict[str, int]
) -> dict[str, Any]:
    return {
        "runs": count,
        "seconds": round(seconds, 2),
        "per_second": round(count / seconds, 2),
        "cpu_percent": meter.percent(),
        "cpu_ms_per_run": {
            name: round(1000 * used / count, 1) for name, used in meter.used.items()
        },
        "statuses": statuses,
    }


async def run(options: Options) -> dict[str, Any]:
    """Start everything; measure the no-op baseline, then the pipeline."""
    with (
        results_folder("pipeline") as folder,
        Children(folder) as children,
        EmulatorProcess.start("--log-level", "WARNING") as emulator_process,
        EmulatorAdmin(emulator_process.url) as emulator,
    ):
        emulator_child = Child(
            "emulator", emulator_process.process, folder / "emulator.log"
        )
        temporal = await start_temporal(children, on_disk=options.on_disk)
        database = folder / "subscribers.db"
        common = {
            "temporal_address": temporal.address,
            "mirror_root_url": emulator.root_url,
            "storage_url": f"file://{folder / 'objects'}",
            "database_url": f"sqlite:///{database}",
        }
        noop_env = mirrorflow_env(
            **common, temporal_task_queue=f"bench-noop-{uuid.uuid4().hex[:8]}"
        )
        env = mirrorflow_env(
            **common, temporal_task_queue=f"bench-pipeline-{uuid.uuid4().hex[:8]}"
        )
        webhook, url = await start_webhook(children, env)
        env["MIRRORFLOW_CALLBACK_URL"] = f"{url}/notify"
        user = emulator.create_user()
        settings = load_settings(**common, callback_url=f"{url}/notify")
        await asyncio.to_thread(
            add_subscriber, settings, "bench-user", user.credentials
        )

        results: dict[str, Any] = {"options": options.__dict__}
        results["noop"] = await measure_noop(
            temporal.client, children, noop_env, options
        )
        children.started.append(emulator_child)
        try:
            results["pipeline"] = await measure_pipeline(
                temporal.client, children, env, emulator, user, options, folder
            )
        finally:
            children.started.remove(emulator_child)
        webhook.check_alive()

    return results


def report(results: dict[str, Any]) -> str:
    """Return the table of one run."""
    base = results["noop"]
    rows = []
    for name, label in (("noop", "no-op workflow"), ("pipeline", "mirrorflow")):
        got = results[name]
        per_run = got["cpu_ms_per_run"]
        rows.append(
            [
                label,
                got["runs"],
                got["seconds"],
                got["per_second"],
                ratio(got["per_second"], base["per_second"]),
                per_run.get("temporal", 0.0),
                per_run.get("noop-worker", per_run.get("worker", 0.0)),
                per_run.get("webhook", 0.0),
                per_run.get("emulator", 0.0),
                per_run.get("bench", 0.0),
                got["statuses"].get("Completed", 0) - 1,
            ]
        )
    table = markdown_table(
        [
            "workflow",
            "runs",
            "seconds",
            "completed/s",
            "÷ no-op",
            "CPU ms/run Temporal",
            "worker",
            "webhook",
            "emulator",
            "bench",
            "completed",
        ],
        rows,
    )
    profiled = results["pipeline"].get("profile")
    if profiled:
        table += "\n\n" + markdown_table(
            ["worker CPU spent in", "% of samples"], profiled["by_code"]
        )
        table += "\n\n" + markdown_table(
            ["inside mirrorflow's function", "% of samples"], profiled["through"]
        )

    return table


def chart(results: dict[str, Any]) -> Any:
    """Draw completed runs per second and CPU per run for both workflows."""
    figure, (left, right) = new_figure(2)
    names = ["noop", "pipeline"]
    labels = ["no-op workflow", "mirrorflow pipeline"]
    rates = [results[name]["per_second"] for name in names]
    left.bar(labels, rates)
    left.set_ylabel("completed runs per second")
    left.set_title("End to end")
    for index, value in enumerate(rates):
        left.annotate(f"{value:.1f}", (index, value), ha="center", va="bottom")

    bottoms = [0.0, 0.0]
    for process in ("temporal", "worker", "webhook", "emulator", "bench"):
        values = [
            results[name]["cpu_ms_per_run"].get(
                "noop-worker" if process == "worker" and name == "noop" else process,
                0.0,
            )
            for name in names
        ]
        right.bar(labels, values, bottom=bottoms, label=process)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    right.set_ylabel("CPU ms per run")
    right.set_title("Where the CPU goes")
    right.legend(fontsize=8)

    return figure


def main() -> None:
    """Run the benchmark and report it."""
    options = parse_options()
    results = run_async(run(options))
    text = report(results)
    print(text)
    save("pipeline", {**results, "table": text}, chart(results))


if __name__ == "__main__":
    main()
