"""Resend one notification 100 times among fresh ones; count the runs.

    python -m bench.duplicates [--quick] [--resends 100]

One sender, one request at a time: the original notification, then
``--resends`` resends of it, each followed by a fresh notification (an item
of its own). Twice:

1. while the original's run is still open (no worker polls yet), where a
   resend joins the running run (``USE_EXISTING``);
2. after every run has completed (a worker ran them), where a resend is
   refused by id and starts nothing (``ALLOW_DUPLICATE_FAILED_ONLY``).

Afterwards every run on the task queue is listed: each distinct
notification must have exactly one. The baseline of the resends' ack
latency is the fresh notifications' in the same phase.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from temporalio.client import Client

from activities.subscribers import SubscriberStore
from bench import load
from bench.harness import (
    BENCH_USER,
    BENCH_VERIFY_TOKEN,
    Children,
    mirrorflow_env,
    notification_body,
    results_folder,
    run_async,
    start_temporal,
    start_webhook,
    start_worker,
    wait_for_log,
)
from bench.report import markdown_table, new_figure, ratio, save
from emulator.testing import EmulatorAdmin, EmulatorProcess
from webhook.notifications import parse_notification
from workflows.models import sha256_hex, workflow_id_for


@dataclass(frozen=True)
class Options:
    """How many resends in each phase."""

    resends: int


def parse_options() -> Options:
    """Return the command line's options; ``--quick`` sends 20 resends."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resends", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="20 resends per phase")
    args = parser.parse_args()

    return Options(resends=20 if args.quick else args.resends)


async def send_phase(
    url: str, original: bytes, phase: str, resends: int
) -> list[load.Answer]:
    """Send resends of ``original`` interleaved with fresh notifications."""

    def bodies(number: int) -> tuple[bytes, str]:
        if number % 2 == 0:
            return original, "resend"
        return notification_body(f"fresh-{phase}-{number}"), "fresh"

    answers, _ = await load.drive(
        url, bodies, concurrency=1, count=2 * resends, seconds=300
    )

    return answers


async def wait_until_closed(client: Client, task_queue: str) -> None:
    """Wait until no run on the task queue is open."""
    query = f"TaskQueue = '{task_queue}' AND ExecutionStatus = 'Running'"
    for _ in range(600):
        if (await client.count_workflows(query)).count == 0:
            return
        await asyncio.sleep(0.5)

    raise TimeoutError(f"Runs on {task_queue} were still open after 300 s.")


def webhook_counters(url: str) -> dict[str, float]:
    """Return the webhook's started and duplicate counters from /metrics."""
    text = httpx.get(url + "/metrics", trust_env=False).text
    found = {}
    for name in ("workflows_started", "duplicates"):
        matched = re.search(rf"^mirrorflow_webhook_{name}_total (\S+)$", text, re.M)
        found[name] = float(matched.group(1)) if matched else 0.0

    return found


async def run(options: Options) -> dict[str, Any]:
    """Send both phases and count the runs."""
    with (
        results_folder("duplicates") as folder,
        Children(folder) as children,
        EmulatorProcess.start("--log-level", "WARNING") as emulator_process,
        EmulatorAdmin(emulator_process.url) as emulator,
    ):
        temporal = await start_temporal(children)
        database = folder / "subscribers.db"
        user = emulator.create_user()
        SubscriberStore(database).add(
            BENCH_USER,
            user.credentials,
            verify_token_sha256=sha256_hex(BENCH_VERIFY_TOKEN),
        )
        item, _ = emulator.add_item_with_attachment(user, b"\xff\xd8" + b"1" * 50_000)
        original = notification_body(item["id"])
        task_queue = f"bench-duplicates-{uuid.uuid4().hex[:8]}"
        env = mirrorflow_env(
            temporal_address=temporal.address,
            temporal_task_queue=task_queue,
            mirror_root_url=emulator.root_url,
            storage_url=f"file://{folder / 'objects'}",
            database_url=f"sqlite:///{database}",
        )
        _, url = await start_webhook(children, env)
        notify = url + "/notify"

        first, _ = await load.drive(
            notify, lambda n: (original, "original"), concurrency=1, count=1, seconds=30
        )
        running = await send_phase(notify, original, "running", options.resends)

        worker = start_worker(children, env)
        await wait_for_log(worker, "worker_started")
        await wait_until_closed(temporal.client, task_queue)
        completed = await send_phase(notify, original, "completed", options.resends)
        await wait_until_closed(temporal.client, task_queue)

        listed = temporal.client.list_workflows(f"TaskQueue = '{task_queue}'")
        runs = Counter([execution.id async for execution in listed])
        counters = webhook_counters(url)

    answers = first + running + completed
    distinct = {workflow_id_for(parse_notification(original))}
    for answer in running + completed:
        if answer.tag == "fresh":
            distinct.add(_id_of(answer))

    return {
        "options": options.__dict__,
        "statuses": dict(Counter(str(a.status) for a in answers)),
        "distinct_notifications": len(distinct),
        "runs": sum(runs.values()),
        "runs_of_original": runs[workflow_id_for(parse_notification(original))],
        "ids_with_more_than_one_run": sum(1 for n in runs.values() if n > 1),
        "ids_without_a_run": len(distinct - set(runs)),
        "webhook_counters": counters,
        "latency": {
            "running": _latencies(running),
            "completed": _latencies(completed),
        },
    }


def _id_of(answer: load.Answer) -> str:
    import json

    workflow_id: str = json.loads(answer.body)["workflow_id"]

    return workflow_id


def _latencies(answers: list[load.Answer]) -> dict[str, dict[str, Any]]:
    result = {}
    for tag in ("fresh", "resend"):
        ordered = sorted(a.latency * 1000 for a in answers if a.tag == tag)
        result[tag] = {
            "count": len(ordered),
            "p50_ms": round(load.percentile(ordered, 50), 2),
            "p90_ms": round(load.percentile(ordered, 90), 2),
            "max_ms": round(ordered[-1], 2) if ordered else 0.0,
            "all_ms": [round(x, 2) for x in ordered],
        }

    return result


def report(results: dict[str, Any]) -> str:
    """Return the tables of one run."""
    rows = []
    for phase, label in (
        ("running", "original's run open"),
        ("completed", "original's run completed"),
    ):
        fresh = results["latency"][phase]["fresh"]
        for tag in ("fresh", "resend"):
            got = results["latency"][phase][tag]
            rows.append(
                [
                    label,
                    tag,
                    got["count"],
                    got["p50_ms"],
                    got["p90_ms"],
                    got["max_ms"],
                    ratio(got["p50_ms"], fresh["p50_ms"]),
                ]
            )
    latency = markdown_table(
        ["phase", "notification", "sent", "p50 ms", "p90 ms", "max ms", "p50 ÷ fresh"],
        rows,
    )
    counters = results["webhook_counters"]
    runs = (
        f"distinct notifications: {results['distinct_notifications']}; runs: "
        f"{results['runs']}; runs of the resent notification: "
        f"{results['runs_of_original']}; ids with more than one run: "
        f"{results['ids_with_more_than_one_run']}; without a run: "
        f"{results['ids_without_a_run']}. Webhook counted "
        f"{counters['workflows_started']:.0f} started and "
        f"{counters['duplicates']:.0f} duplicates; answers: {results['statuses']}."
    )

    return f"{latency}\n\n{runs}"


def chart(results: dict[str, Any]) -> Any:
    """Draw the ack latency of fresh notifications and resends in each phase."""
    figure, axes = new_figure(1, width=8)
    data, labels = [], []
    for phase in ("running", "completed"):
        for tag in ("fresh", "resend"):
            data.append(results["latency"][phase][tag]["all_ms"])
            labels.append(f"{tag}\n(run {'open' if phase == 'running' else 'done'})")
    axes.boxplot(data, tick_labels=labels)
    axes.set_ylabel("ack latency, ms")
    axes.set_title("Fresh notifications and resends, one sender at a time")

    return figure


def main() -> None:
    """Run the benchmark and report it."""
    options = parse_options()
    results = run_async(run(options))
    text = report(results)
    print(text)
    save("duplicates", {**results, "table": text}, chart(results))


if __name__ == "__main__":
    main()
