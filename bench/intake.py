"""Measure the intake log: the ack path with the log on and off, and an outage.

    python -m bench.intake [--seconds 10] [--rounds 3] [--outage 60] [--on-disk]
        [--profile]

First, the bare Starlette app and the webhook with ``MIRRORFLOW_INTAKE=log``
side by side, taking turns under wrk at 64 connections for ``--rounds``
rounds. This machine's speed drifts by more than the difference measured,
so each round's ratio compares two runs a few seconds apart, and the median
ratio is the result. No Temporal runs: a forwarder starting workflows
between the webhook's turns would take CPU from the bare app's. So nothing
is forwarded, the log may grow as large as it needs to, and once the
webhook has stopped, every 200 it gave must be a row of its log.

Then, in one run, on one Temporal dev server:

1. the bare Starlette app (:mod:`bench.apps`) and the webhook with
   ``MIRRORFLOW_INTAKE=direct`` under wrk at 64 connections (every request a
   fresh item), then each of them and the webhook with
   ``MIRRORFLOW_INTAKE=log`` offered 1,000 notifications per second open
   loop; the log webhook once more, once its log is empty, with its threads
   alone on the first CPU and everything else on the others, as on a
   machine it does not share with Temporal;
2. the webhook with the log, offered ten times the direct webhook's rate of
   200s measured in step 1 (ten times what Temporal takes from one webhook);
3. the webhook with the log against a Temporal whose state is on disk,
   offered 100 notifications per second while Temporal is stopped for
   ``--outage`` seconds and started again.

After steps 1-3 the log is drained (``/readyz`` reports the backlog), then
every workflow on the run's task queue is listed: each notification answered
200 must have exactly one run. No worker runs. Needs wrk. With ``--profile``,
py-spy samples the webhook with the log while wrk loads it in the last round.

Each step also records the CPU time the hypervisor gave to other guests
while it ran ("stolen", in percent of one core): a run on a crowded host
says so in its own results.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sqlite3
import statistics
import time
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from bench import load, profile
from bench.harness import (
    HOST,
    Child,
    Children,
    CpuMeter,
    add_bench_subscriber,
    free_port,
    mirrorflow_env,
    notification_body,
    raise_file_limit,
    results_folder,
    run_async,
    share_cpus,
    start_bare,
    start_temporal,
    start_webhook,
)
from webhook.notifications import parse_notification
from workflows.models import workflow_id_for


def parse_options() -> argparse.Namespace:
    """Return the command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--on-disk", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the log webhook with py-spy in the last round",
    )

    return parser.parse_args()


def workflow_id(item_id: str) -> str:
    """Return the workflow id the webhook gives a bench notification."""
    return workflow_id_for(parse_notification(notification_body(item_id)))


async def offer(url: str, prefix: str, rate: float, seconds: float) -> dict[str, Any]:
    """Offer fresh notifications open loop; return the summary and acked items."""

    def bodies(number: int) -> tuple[bytes, str]:
        item_id = f"{prefix}-{number}"
        return notification_body(item_id), item_id

    answers, elapsed = await load.offer(
        url + "/notify", bodies, rate=rate, seconds=seconds, max_in_flight=20_000
    )
    summary = load.summarize(answers, elapsed).as_dict()
    summary["offered_per_second"] = rate
    summary["acked"] = [a.tag for a in answers if a.status == 200]
    summary["failures"] = dict(
        collections.Counter(a.body.decode() for a in answers if a.status == 0)
    )

    return summary


async def drain(
    url: str, watch: Sequence[Child], within: float = 600
) -> dict[str, Any]:
    """Wait until the webhook's intake log is empty; return the readiness body.

    Raises:
        BenchError: a process in ``watch`` (the webhook, the dev server it
            forwards to) exited meanwhile.
    """
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while True:
            for child in watch:
                child.check_alive()
            body: dict[str, Any] = (await http.get("/readyz")).json()
            if body["intake"]["backlog"] == 0 or time.monotonic() > deadline:
                return body
            await asyncio.sleep(0.5)


async def runs_per_id(client: Client, task_queue: str) -> collections.Counter[str]:
    """Return how many runs each workflow id has on a task queue."""
    query = f'TaskQueue="{task_queue}"'

    return collections.Counter([r.id async for r in client.list_workflows(query)])


async def check_once(
    client: Client, task_queue: str, acked_items: list[str]
) -> dict[str, int]:
    """Count acknowledged notifications without a run, or with more than one."""
    expected = {workflow_id(item) for item in acked_items}
    deadline = time.monotonic() + 60
    while True:
        runs = await runs_per_id(client, task_queue)
        if expected <= runs.keys() or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)

    return {
        "acknowledged": len(expected),
        "acknowledged_without_run": len(expected - runs.keys()),
        "ids_with_more_than_one_run": sum(1 for n in runs.values() if n > 1),
    }


def wrk(url: str, seconds: float) -> dict[str, Any]:
    """Load an app with wrk at 64 connections after a short warm-up."""
    run_id = uuid.uuid4().hex[:8]
    load.run_wrk(url + "/notify", run_id=run_id + "-warm", connections=8, seconds=2)

    return load.run_wrk(
        url + "/notify", run_id=run_id, connections=64, seconds=seconds
    ).as_dict()


async def warm_up(url: str) -> None:
    """Send pings over one connection for 2 s.

    The first requests after a start pay for imports and connections; a
    webhook measured without a wrk run first gets these instead.
    """
    await asyncio.to_thread(
        load.run_wrk,
        url + "/notify",
        run_id=uuid.uuid4().hex[:8] + "-warm",
        connections=1,
        seconds=2,
    )


def answered_200(summary: load.Summary) -> int:
    """Return how many 200s a wrk run counted."""
    return summary.requests - summary.statuses["non-2xx"]


async def rounds(options: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Bare and log webhook in turns under wrk; check the 200s against the log."""
    database = folder / "subscribers-rounds.db"
    add_bench_subscriber(database)
    intake = folder / f"intake-rounds-{uuid.uuid4().hex[:8]}.db"
    turns: list[dict[str, Any]] = []
    acknowledged = 0
    with Children(folder) as children:
        _, bare_root = await start_bare(children, name="bare-rounds")
        bare_url = bare_root + "/notify"
        env = mirrorflow_env(
            # Nothing listens there: the forwarder keeps backing off.
            temporal_address=f"{HOST}:{free_port()}",
            database_url=f"sqlite:///{database}",
            intake="log",
            intake_path=str(intake),
            intake_max_backlog=str(10_000_000),
            intake_max_bytes=str(2**32),
        )
        webhook, url = await start_webhook(children, env, name="webhook-rounds")
        log_url = url + "/notify"

        def run(target: str, connections: int, seconds: float) -> load.Summary:
            run_id = uuid.uuid4().hex[:8]
            return load.run_wrk(
                target, run_id=run_id, connections=connections, seconds=seconds
            )

        await asyncio.to_thread(run, bare_url, 8, 2)
        acknowledged += answered_200(await asyncio.to_thread(run, log_url, 8, 2))
        raw = folder / "webhook-rounds.pyspy.txt"
        breakdown = None
        for number in range(1, options.rounds + 1):
            bare = await asyncio.to_thread(run, bare_url, 64, options.seconds)
            recording = None
            if options.profile and number == options.rounds:
                recording = profile.record(webhook.pid, raw, seconds=options.seconds)
            logged = await asyncio.to_thread(run, log_url, 64, options.seconds)
            if recording is not None:
                breakdown = profile.stop(recording, raw).__dict__
            acknowledged += answered_200(logged)
            turns.append(
                {
                    "bare": bare.as_dict(),
                    "log": logged.as_dict(),
                    "ratio": round(logged.per_second / bare.per_second, 3),
                }
            )
        webhook.check_alive()
        # SIGTERM: the webhook commits what is pending and closes its log.
        children.stop(webhook)

    with contextlib.closing(sqlite3.connect(intake)) as db:
        [rows] = db.execute("SELECT count(*) FROM intake").fetchone()

    return {
        "rounds": turns,
        "median_ratio": statistics.median(turn["ratio"] for turn in turns),
        "answered_200": acknowledged,
        "rows_in_log": rows,
        "profile": breakdown,
    }


async def steady_state(options: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Steps 1 and 2: bare, direct and log under wrk, 1,000/s and overload."""
    results: dict[str, Any] = {}
    with Children(folder) as children:
        temporal = await start_temporal(children, on_disk=options.on_disk)
        database = folder / "subscribers.db"
        add_bench_subscriber(database)

        bare, bare_url = await start_bare(children)
        results["bare"] = {
            "wrk": await asyncio.to_thread(wrk, bare_url, options.seconds),
            "rate": await offer(bare_url, "bare", options.rate, options.seconds),
        }
        children.stop(bare)

        for mode in ("direct", "log"):
            task_queue = f"bench-intake-{mode}-{uuid.uuid4().hex[:8]}"
            env = mirrorflow_env(
                temporal_address=temporal.address,
                temporal_task_queue=task_queue,
                database_url=f"sqlite:///{database}",
                intake=mode,
                intake_path=str(folder / f"intake-{uuid.uuid4().hex[:8]}.db"),
            )
            webhook, url = await start_webhook(children, env, name=f"webhook-{mode}")
            result: dict[str, Any] = {}
            # The log webhook's throughput is measured in rounds (above): a
            # wrk run here would leave a backlog of about a hundred thousand
            # rows for this step's check to wait for.
            if mode == "direct":
                result["wrk"] = await asyncio.to_thread(wrk, url, options.seconds)
            else:
                # As the others were warmed up by their wrk runs.
                await warm_up(url)
            prefix = uuid.uuid4().hex[:8]
            result["rate"] = await offer(url, prefix, options.rate, options.seconds)
            acked = list(result["rate"]["acked"])
            if mode == "log":
                # Again from an empty log, with the webhook on a core of its own.
                await drain(url, [webhook, temporal.child])
                share_cpus(webhook, [temporal.child], own_core=True)
                result["rate_own_core"] = await offer(
                    url, prefix + "-own-core", options.rate, options.seconds
                )
                share_cpus(webhook, [temporal.child], own_core=False)
                acked += result["rate_own_core"]["acked"]
                factor_rate = 10 * results["direct"]["wrk"]["per_second"]
                result["overload"] = await offer(
                    url, prefix + "-over", factor_rate, options.seconds
                )
                acked += result["overload"]["acked"]
                began = time.monotonic()
                result["drained"] = await drain(url, [webhook, temporal.child])
                result["drain_seconds"] = round(time.monotonic() - began, 1)
            result["check"] = await check_once(temporal.client, task_queue, acked)
            webhook.check_alive()
            children.stop(webhook)
            results[mode] = result

    return results


async def outage(options: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Step 3: a steady stream while Temporal is stopped, then started again."""
    with Children(folder) as children:
        temporal = await start_temporal(children, on_disk=True)
        address = temporal.address
        subscribers = folder / "subscribers.db"
        add_bench_subscriber(subscribers)
        task_queue = f"bench-intake-outage-{uuid.uuid4().hex[:8]}"
        env = mirrorflow_env(
            temporal_address=address,
            temporal_task_queue=task_queue,
            database_url=f"sqlite:///{subscribers}",
            intake="log",
            intake_path=str(folder / f"intake-{uuid.uuid4().hex[:8]}.db"),
        )
        webhook, url = await start_webhook(children, env, name="webhook-outage")

        seconds = options.outage + 20
        stream = asyncio.create_task(offer(url, uuid.uuid4().hex[:8], 100, seconds))
        await asyncio.sleep(10)
        # Off the event loop, so that the stream of pings goes on meanwhile.
        await asyncio.to_thread(children.stop, temporal.child)
        await asyncio.sleep(options.outage)
        temporal = await start_temporal(
            children,
            on_disk=True,
            port=int(address.rsplit(":", 1)[1]),
            database=temporal.database,
        )
        streamed = await stream
        began = time.monotonic()
        drained = await drain(url, [webhook, temporal.child])
        drain_seconds = round(time.monotonic() - began, 1)
        check = await check_once(temporal.client, task_queue, streamed["acked"])
        webhook.check_alive()

    return {
        "stream": streamed,
        "drained": drained,
        "drain_seconds": drain_seconds,
        "check": check,
    }


def report(results: dict[str, Any]) -> str:
    """Return the results as a short Markdown summary."""
    lines: list[str] = []
    if "rounds" in results:
        turns = results["rounds"]
        lines += [
            "| round | bare 200/s | bare p99 ms | log 200/s | log p99 ms "
            "| log ÷ bare |",
            "|---|---|---|---|---|---|",
        ]
        for number, turn in enumerate(turns["rounds"], 1):
            lines.append(
                f"| {number} | {turn['bare']['per_second']} | "
                f"{turn['bare']['p99_ms']} | {turn['log']['per_second']} | "
                f"{turn['log']['p99_ms']} | {turn['ratio']} |"
            )
        kept = turns["rows_in_log"] >= turns["answered_200"]
        lines += [
            "",
            f"Median log ÷ bare: {turns['median_ratio']}. The log webhook "
            f"answered 200 to {turns['answered_200']}; its log holds "
            f"{turns['rows_in_log']} rows "
            f"({'every 200 is on disk' if kept else 'SOME 200s ARE NOT ON DISK'}).",
        ]
        profiled = turns.get("profile")
        if profiled:
            lines += ["", "Where the log webhook's CPU goes under wrk (% of samples):"]
            lines += [f"- {name}: {share}" for name, share in profiled["by_code"]]
            lines += ["", "Inside mirrorflow's functions:"]
            lines += [f"- {name}: {share}" for name, share in profiled["through"]]
        lines.append("")

    steady = results["steady"]
    lines += [
        "| app | wrk 64 conns: 200/s | p99 ms | 1,000/s offered: p99 ms | non-200 |",
        "|---|---|---|---|---|",
    ]
    for name in ("bare", "direct", "log"):
        run = steady[name]
        loaded = run.get("wrk")
        lines.append(
            f"| {name} | {loaded['per_second'] if loaded else '(rounds)'} | "
            f"{loaded['p99_ms'] if loaded else '-'} | "
            f"{run['rate']['p99_ms']} | {run['rate']['errors']} |"
        )
    log_run = steady["log"]
    own = log_run["rate_own_core"]
    over = log_run["overload"]
    lines += [
        "",
        f"Log, {own['offered_per_second']:.0f}/s offered again with the webhook "
        f"on a core of its own: p50 {own['p50_ms']} ms, p99 {own['p99_ms']} ms, "
        f"statuses {own['statuses']}.",
        f"Overload (log): {over['offered_per_second']:.0f}/s offered "
        f"(10x direct), p50 {over['p50_ms']} ms, p99 {over['p99_ms']} ms, "
        f"statuses {over['statuses']}; drained in {log_run['drain_seconds']} s; "
        f"check {log_run['check']}.",
    ]
    if "outage" in results:
        outage = results["outage"]
        stream = outage["stream"]
        lines.append(
            f"Outage: statuses {stream['statuses']}, p99 {stream['p99_ms']} ms; "
            f"drained in {outage['drain_seconds']} s; check {outage['check']}."
        )
    stolen = [
        f"{step} {results[step]['stolen_percent']}"
        for step in ("rounds", "steady", "outage")
        if step in results
    ]
    lines.append(
        "CPU the hypervisor gave to other guests, % of one core: "
        + ", ".join(stolen)
        + "."
    )

    return "\n".join(lines)


async def run(options: argparse.Namespace) -> dict[str, Any]:
    """Run every step; return the results."""
    raise_file_limit()
    with results_folder("intake") as folder:
        results: dict[str, Any] = {}
        if options.rounds > 0:
            results["rounds"] = await measure_stolen(rounds(options, folder))
        results["steady"] = await measure_stolen(steady_state(options, folder))
        if options.outage > 0:
            results["outage"] = await measure_stolen(outage(options, folder))

    return results


async def measure_stolen(
    step: Coroutine[Any, Any, dict[str, Any]],
) -> dict[str, Any]:
    """Run ``step``; add to its results the CPU the hypervisor took meanwhile."""
    meter = CpuMeter([])
    meter.start()
    result = await step
    meter.stop()

    return {**result, "stolen_percent": meter.stolen_percent()}


def main() -> None:
    """Run the benchmark and print its summary and JSON."""
    options = parse_options()
    results = run_async(run(options))
    for step in (
        results["steady"]["bare"]["rate"],
        results["steady"]["direct"]["rate"],
        results["steady"]["log"]["rate"],
        results["steady"]["log"]["rate_own_core"],
        results["steady"]["log"]["overload"],
        results.get("outage", {}).get("stream", {}),
    ):
        step.pop("acked", None)
    text = report(results)
    print(text)
    out = Path(__file__).parent / "results" / "intake.json"
    out.write_text(json.dumps({**results, "table": text}, indent=2))


if __name__ == "__main__":
    main()
