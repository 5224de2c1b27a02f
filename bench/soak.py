"""Soak the whole service with faults injected at random; check every promise.

    python -m bench.soak [--count 300] [--seed N] [--intake direct|log]

Everything runs as deployed, each in a process of its own: a Temporal dev
server with its state on disk, the Mirror emulator, fake-gcs-server (storage
is a ``gs://`` bucket), ``mirrorflow webhook`` and ``mirrorflow worker``.
A few users share ``--count`` photos on the emulator, which delivers each
notification to the webhook as Mirror did, resending what is not answered
200. Meanwhile, one fault at a time, chosen at random:

- a Mirror call (token, ``timeline.get``, ``attachments.get``, content)
  answers 500, 503 or 429, drops the connection, cuts the download short or
  takes 8 s, for the next few requests;
- a user's access tokens expire;
- the worker is SIGKILLed and started again;
- the webhook is SIGKILLed and started again on the same port (and, with
  ``--intake log``, the same log);
- the storage emulator stops for a few seconds;
- Temporal stops for a few seconds and starts again on its file.

When the shares are done the faults stop and the soak waits for every run to
end. It then checks, and prints: each notification the webhook answered 200
has a completed run (``MirrorOutcome=stored``); each has exactly one stored
object, byte for byte the photo shared; no workflow id completed twice.
The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from activities.storage import Storage, item_prefix, open_storage
from bench.harness import (
    Child,
    Children,
    Temporal,
    free_port,
    machine,
    mirrorflow_env,
    results_folder,
    run_async,
    start_temporal,
    start_webhook,
    start_worker,
    wait_for_log,
)
from bench.report import markdown_table
from emulator.testing import EmulatorAdmin, EmulatorProcess, EmulatorUser
from mirrorflow.settings import load_settings
from mirrorflow.subscribing import add_subscriber
from tests.fixtures.storage import FakeGcsServer, fake_gcs_binary
from webhook.notifications import notification_from
from workflows.models import OUTCOME, Outcome, workflow_id_for

USERS = 3
BUCKET = "soak"


def parse_options() -> argparse.Namespace:
    """Return the command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="photos shared")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--intake", choices=("direct", "log"), default="direct")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.1,
        help="seconds between two shares (default 0.1)",
    )

    return parser.parse_args()


@dataclass
class Service:
    """The processes of one soak, and how to restart each of them."""

    children: Children
    folder: Path
    temporal: Temporal
    gcs: FakeGcsServer
    webhook_env: dict[str, str]
    worker_env: dict[str, str]
    webhook_port: int
    webhook: Child | None = None
    worker: Child | None = None

    async def start_webhook(self) -> None:
        """Start the webhook on its port (its log, if any, is in its env)."""
        self.webhook, _ = await start_webhook(
            self.children, self.webhook_env, port=self.webhook_port
        )

    async def start_worker(self) -> None:
        """Start a worker and wait until it polls its task queue."""
        self.worker = start_worker(self.children, self.worker_env)
        await wait_for_log(self.worker, "worker_started")

    async def restart_temporal(self, down: float) -> None:
        """Stop Temporal, wait ``down`` seconds, start it again on its file."""
        address = self.temporal.address
        await asyncio.to_thread(self.children.stop, self.temporal.child)
        await asyncio.sleep(down)
        self.temporal = await start_temporal(
            self.children,
            on_disk=True,
            port=int(address.rsplit(":", 1)[1]),
            database=self.temporal.database,
        )

    def kill(self, child: Child | None) -> None:
        """SIGKILL a child's process group and wait until it is gone."""
        assert child is not None
        child.kill()
        self.children.started.remove(child)


@dataclass
class Chaos:
    """Faults injected one at a time, at random, until told to stop."""

    service: Service
    emulator: EmulatorAdmin
    users: list[EmulatorUser]
    rng: random.Random
    injected: collections.Counter[str] = field(default_factory=collections.Counter)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Inject faults, a second or three apart, until :meth:`stop`."""
        kinds: dict[str, Callable[[], Any]] = {
            "mirror": self.mirror_fault,
            "token expiry": self.expire_tokens,
            "worker SIGKILL": self.kill_worker,
            "webhook SIGKILL": self.kill_webhook,
            "storage outage": self.storage_outage,
            "Temporal restart": self.restart_temporal,
        }
        # Each round makes every kind of fault once, Mirror's three times, in
        # a random order, so that even a short soak meets all of them.
        round_of_faults = [*kinds, "mirror", "mirror"]
        upcoming: list[str] = []
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rng.uniform(1.0, 3.0)):
                    await self.stopping.wait()
            if self.stopping.is_set():
                return
            if not upcoming:
                upcoming = self.rng.sample(round_of_faults, len(round_of_faults))
            kind = upcoming.pop()
            await kinds[kind]()
            self.injected[kind] += 1

    def stop(self) -> None:
        """Stop injecting once the fault under way is over."""
        self.stopping.set()

    async def mirror_fault(self) -> None:
        """Make the next few requests of one Mirror route fail one way."""
        routes = {
            "token": r"^/oauth2/v4/token$",
            "timeline.get": r"^/mirror/v1/timeline/[^/]+$",
            "attachments.get": r"^/mirror/v1/timeline/[^/]+/attachments/[^/]+$",
            "content": r"^/content/timeline/[^/]+/attachments/[^/]+$",
        }
        faults: dict[str, dict[str, Any]] = {
            "500": {"status": 500},
            "503": {"status": 503},
            "429": {"status": 429},
            "drop": {"drop": True},
            "8 s": {"latency": 8.0},
        }
        if self.rng.random() < 0.2:
            faults = {"cut": {"drop_after_bytes": 1000}}
            route = "content"
        else:
            route = self.rng.choice(list(routes))
        [fault] = self.rng.choices(list(faults))
        await asyncio.to_thread(
            self.emulator.add_fault,
            routes[route],
            method="GET" if route != "token" else None,
            times=self.rng.randint(1, 4),
            **faults[fault],
        )
        self.injected[f"  {route}: {fault}"] += 1

    async def expire_tokens(self) -> None:
        """Expire one user's access tokens; the next call must refresh."""
        await asyncio.to_thread(
            self.emulator.expire_tokens, self.rng.choice(self.users)
        )

    async def kill_worker(self) -> None:
        """SIGKILL the worker, then start another after a moment."""
        self.service.kill(self.service.worker)
        await asyncio.sleep(self.rng.uniform(0.5, 3.0))
        await self.service.start_worker()

    async def kill_webhook(self) -> None:
        """SIGKILL the webhook mid-stream, then start it again."""
        self.service.kill(self.service.webhook)
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        await self.service.start_webhook()

    async def storage_outage(self) -> None:
        """Stop the storage emulator for a few seconds."""
        await asyncio.to_thread(self.service.gcs.stop)
        await asyncio.sleep(self.rng.uniform(2.0, 6.0))
        await asyncio.to_thread(self.service.gcs.start)

    async def restart_temporal(self) -> None:
        """Stop Temporal for a few seconds, then start it again."""
        await self.service.restart_temporal(self.rng.uniform(2.0, 5.0))


async def wait_for_runs(
    client: Client, task_queue: str, within: float
) -> dict[str, list[WorkflowExecution]]:
    """Wait until no run on the task queue is running; return the runs by id."""
    deadline = time.monotonic() + within
    while True:
        runs: dict[str, list[WorkflowExecution]] = collections.defaultdict(list)
        async for execution in client.list_workflows(f'TaskQueue="{task_queue}"'):
            runs[execution.id].append(execution)
        is_running = any(
            execution.status == WorkflowExecutionStatus.RUNNING
            for executions in runs.values()
            for execution in executions
        )
        if not is_running or time.monotonic() > deadline:
            return runs

        await asyncio.sleep(2)


def check(
    shared: dict[str, tuple[EmulatorUser, str, bytes]],
    deliveries: list[dict[str, Any]],
    runs: dict[str, list[WorkflowExecution]],
    storage: Storage,
) -> dict[str, Any]:
    """Compare what was acknowledged with what completed and what was stored."""
    acked: dict[str, str] = {}
    for attempt in deliveries:
        if attempt["statusCode"] == 200:
            body = attempt["body"]
            acked[body["itemId"]] = workflow_id_for(notification_from(body))
    completed: set[str] = set()
    completed_twice = 0
    for runs_of_id in runs.values():
        stored_runs = [
            r
            for r in runs_of_id
            if r.status == WorkflowExecutionStatus.COMPLETED
            and r.typed_search_attributes.get(OUTCOME) == Outcome.STORED
        ]
        if stored_runs:
            completed.add(runs_of_id[0].id)
        completed_twice += len(stored_runs) > 1

    stored, wrong_bytes, extra_objects = 0, 0, 0
    for item_id in acked:
        _, user_token, photo = shared[item_id]
        names = storage.list(item_prefix(user_token, item_id))
        extra_objects += max(0, len(names) - 1)
        if names:
            stored += 1
            wrong_bytes += storage.read(names[0]) != photo
    statuses = collections.Counter(
        str(r.status.name if r.status else "?") for rs in runs.values() for r in rs
    )

    return {
        "shared": len(shared),
        "acknowledged": len(acked),
        "never_acknowledged": len(shared) - len(acked),
        "acknowledged_and_completed": len(completed & set(acked.values())),
        "acknowledged_and_stored": stored,
        "stored_with_wrong_bytes": wrong_bytes,
        "extra_objects": extra_objects,
        "ids_completed_twice": completed_twice,
        "ids_with_more_than_one_run": sum(len(rs) > 1 for rs in runs.values()),
        "run_statuses": dict(statuses),
        "delivery_attempts": dict(
            collections.Counter(str(a["statusCode"] or "no answer") for a in deliveries)
        ),
    }


def is_sound(result: dict[str, Any]) -> bool:
    """Tell whether every promise held."""
    return bool(
        result["acknowledged"]
        == result["acknowledged_and_completed"]
        == result["acknowledged_and_stored"]
        and result["stored_with_wrong_bytes"] == 0
        and result["extra_objects"] == 0
        and result["ids_completed_twice"] == 0
    )


async def run(options: argparse.Namespace) -> dict[str, Any]:
    """Start the service, share photos under faults, then check the outcome."""
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    with (
        results_folder("soak") as folder,
        Children(folder) as children,
        EmulatorProcess.start("--log-level", "WARNING") as emulator_process,
        EmulatorAdmin(emulator_process.url) as emulator,
    ):
        gcs = FakeGcsServer(fake_gcs_binary(), folder, free_port())
        gcs.start()
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        try:
            gcs.create_bucket(BUCKET)
            temporal = await start_temporal(children, on_disk=True)
            task_queue = f"bench-soak-{uuid.uuid4().hex[:8]}"
            webhook_port = free_port()
            callback = f"http://127.0.0.1:{webhook_port}/notify"
            common = {
                "temporal_address": temporal.address,
                "temporal_task_queue": task_queue,
                "mirror_root_url": emulator.root_url,
                "storage_url": f"gs://{BUCKET}/objects",
                "database_url": f"sqlite:///{folder / 'subscribers.db'}",
                "callback_url": callback,
            }
            env = mirrorflow_env(**common)
            env["STORAGE_EMULATOR_HOST"] = gcs.url
            webhook_env = dict(env)
            webhook_env["MIRRORFLOW_INTAKE"] = options.intake
            webhook_env["MIRRORFLOW_INTAKE_PATH"] = str(folder / "intake.db")
            service = Service(
                children, folder, temporal, gcs, webhook_env, env, webhook_port
            )
            await service.start_webhook()
            await service.start_worker()
            # Mirror's resends are what carry a ping across a webhook restart.
            emulator.configure(delivery_attempts=8, delivery_backoff_max=8.0)

            settings = load_settings(**common)
            users = [emulator.create_user() for _ in range(USERS)]
            tokens = {}
            for number, user in enumerate(users):
                tokens[user.id] = f"soak-{number}-{uuid.uuid4().hex[:6]}"
                await asyncio.to_thread(
                    add_subscriber, settings, tokens[user.id], user.credentials
                )

            shared: dict[str, tuple[EmulatorUser, str, bytes]] = {}

            def share() -> None:
                user = rng.choice(users)
                photo = os.urandom(rng.randint(1_000, 300_000))
                got = emulator.share(user, photo)
                shared[got["item"]["id"]] = (user, tokens[user.id], photo)

            chaos = Chaos(service, emulator, users, rng)
            chaos_task = asyncio.create_task(chaos.run())
            began = time.monotonic()
            for _ in range(options.count):
                await asyncio.to_thread(share)
                await asyncio.sleep(options.pause)
            shared_seconds = time.monotonic() - began
            chaos.stop()
            await chaos_task
            emulator.clear_faults()
            await emulator.wait_until_settled(within=300)
            runs = await wait_for_runs(service.temporal.client, task_queue, 600)
            deliveries = emulator.deliveries()
            result = check(shared, deliveries, runs, open_storage(settings.storage_url))
            for child in (service.webhook, service.worker):
                assert child is not None
                child.check_alive()
        finally:
            gcs.stop()

    result["seed"] = seed
    result["intake"] = options.intake
    result["shared_seconds"] = round(shared_seconds, 1)
    result["faults"] = dict(chaos.injected)
    result["machine"] = machine()

    return result


def report(result: dict[str, Any]) -> str:
    """Return the soak's outcome as Markdown tables."""
    checks = [
        "shared",
        "acknowledged",
        "never_acknowledged",
        "acknowledged_and_completed",
        "acknowledged_and_stored",
        "stored_with_wrong_bytes",
        "extra_objects",
        "ids_completed_twice",
        "ids_with_more_than_one_run",
    ]
    lines = [
        f"Soak: {result['shared']} photos in {result['shared_seconds']} s, "
        f"intake {result['intake']}, seed {result['seed']}.",
        "",
        markdown_table(
            ["check", "count"],
            [[name.replace("_", " "), result[name]] for name in checks],
        ),
        "",
        markdown_table(
            ["fault injected", "times"],
            [[kind, times] for kind, times in sorted(result["faults"].items())],
        ),
        "",
        f"Run statuses: {result['run_statuses']}; delivery attempts by status: "
        f"{result['delivery_attempts']}.",
        "",
        "Every promise held." if is_sound(result) else "A PROMISE WAS BROKEN.",
    ]

    return "\n".join(lines)


def main() -> None:
    """Run the soak, print its report, write its JSON; exit 1 if a check failed."""
    options = parse_options()
    result = run_async(run(options))
    text = report(result)
    print(text)
    out = Path(__file__).parent / "results" / "soak.json"
    out.write_text(json.dumps({**result, "table": text}, indent=2))
    sys.exit(0 if is_sound(result) else 1)


if __name__ == "__main__":
    main()
