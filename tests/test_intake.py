"""With the intake log on, a 200 means on disk, and Temporal gets every ping once.

Each test runs the webhook with ``MIRRORFLOW_INTAKE=log`` against a real
Temporal dev server, served by uvicorn so that the app's lifespan opens the
log and starts the forwarder. No worker runs: the started workflows stay
open on the test's task queue, where they are counted by workflow id.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog.testing
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.subscribers import SubscriberStore
from mirrorflow.settings import Settings, load_settings
from mirrorflow.temporal import DATA_CONVERTER
from tests.fixtures.secrets import SecretRegistry
from tests.fixtures.servers import free_port, serving
from tests.test_webhook import CREDENTIALS, VERIFY_TOKEN, DevServer, ping, sample
from webhook.app import create_app
from webhook.intake import Forwarder, IntakeError, IntakeLog, StartWorkflow
from webhook.metrics import WebhookMetrics
from webhook.notifications import parse_notification
from workflows.models import (
    WORKFLOW_NAME,
    Notification,
    canonical_json,
    sha256_hex,
    workflow_id_for,
)


@pytest.fixture
def settings(task_queue: str, tmp_path: Path) -> Settings:
    """Return settings with the intake log on, in the test's own folder."""
    return load_settings(
        temporal_task_queue=task_queue,
        intake="log",
        intake_path=tmp_path / "intake" / "intake.db",
        check_sender=False,
        start_deadline=1.0,
        retry_after=7,
    )


def refusing_client(temporal_env: WorkflowEnvironment) -> Client:
    """Return a client whose every start Temporal refuses (no such namespace)."""
    return Client(
        temporal_env.client.service_client,
        namespace="no-such-namespace",
        data_converter=DATA_CONVERTER,
    )


async def workflow_ids(client: Client, task_queue: str) -> collections.Counter[str]:
    """Return how many runs each workflow id has on a task queue."""
    query = f'TaskQueue="{task_queue}"'

    return collections.Counter([run.id async for run in client.list_workflows(query)])


async def runs_once_visible(
    client: Client, task_queue: str, expected: set[str], within: float = 20
) -> collections.Counter[str]:
    """Return the runs per workflow id once every expected id is visible.

    Visibility lags behind starts, and the forwarder may still be at work, so
    poll for a while and return the last count seen if it never gets there.
    """
    deadline = time.monotonic() + within
    while True:
        runs = await workflow_ids(client, task_queue)
        if expected <= runs.keys() or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.2)


async def drained(http: httpx.AsyncClient, within: float = 30) -> dict[str, Any]:
    """Return the readiness body once the intake log is empty."""
    deadline = time.monotonic() + within
    while True:
        body: dict[str, Any] = (await http.get("/readyz")).json()
        if body["intake"]["backlog"] == 0 or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.1)


async def test_intake_acknowledged_pings_start_one_run_each(
    settings: Settings, temporal_client: Client, task_queue: str
) -> None:
    app = create_app(settings, client=temporal_client)
    bodies = [ping() for _ in range(40)]
    resent = ping()

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        responses = await asyncio.gather(
            *(http.post("/notify", json=body) for body in [*bodies, *[resent] * 10])
        )
        ready = await drained(http)

    acknowledged = {r.json()["workflow_id"] for r in responses if r.status_code == 200}
    runs = await runs_once_visible(temporal_client, task_queue, acknowledged)
    assert [r.status_code for r in responses] == [200] * 50
    assert len(acknowledged) == 41
    assert runs == dict.fromkeys(acknowledged, 1)
    assert ready["status"] == "ready"
    assert ready["temporal"] == "serving"
    assert sample(app, "mirrorflow_intake_appended_total") == 50
    assert sample(app, "mirrorflow_intake_forwarded_total") == 50
    assert sample(app, "mirrorflow_webhook_workflows_started_total") == 41


async def test_intake_logs_each_notification_when_its_workflow_starts(
    settings: Settings, temporal_client: Client
) -> None:
    """A 200 from the log is a DEBUG line; the INFO line comes with the start."""
    app = create_app(settings, client=temporal_client)
    body = ping()

    with structlog.testing.capture_logs() as logged:
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
            first = await http.post("/notify", json=body)
            await drained(http)
            resent = await http.post("/notify", json=body)
            await drained(http)

    received = [e for e in logged if e["event"] == "notification_received"]
    forwarded = [e for e in logged if e["event"] == "notification_forwarded"]
    workflow_id = first.json()["workflow_id"]
    assert resent.json()["workflow_id"] == workflow_id
    assert [(e["log_level"], e["status"], e["outcome"]) for e in received] == [
        ("debug", 200, "logged")
    ] * 2
    assert [(e["log_level"], e["outcome"]) for e in forwarded] == [
        ("info", "started"),
        ("info", "duplicate"),
    ]
    for event in forwarded:
        assert event["workflow_id"] == workflow_id
        assert event["item_id"] == body["itemId"]
        assert event["user_token"] == body["userToken"]
        assert event["waited_ms"] >= 0


async def test_intake_checks_the_sender_before_logging(
    settings: Settings, temporal_client: Client, tmp_path: Path
) -> None:
    store = SubscriberStore(tmp_path / "subscribers.db")
    store.add("alice", CREDENTIALS, verify_token_sha256=sha256_hex(VERIFY_TOKEN))
    checked = settings.model_copy(update={"check_sender": True})
    app = create_app(checked, client=temporal_client, subscribers=store)

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        forged = await http.post("/notify", json=ping(verifyToken="guessed"))
        genuine = await http.post("/notify", json=ping())

    assert (forged.status_code, genuine.status_code) == (403, 200)
    assert sample(app, "mirrorflow_intake_appended_total") == 1


async def test_intake_full_answers_503_and_is_not_ready(
    settings: Settings, temporal_env: WorkflowEnvironment
) -> None:
    small = settings.model_copy(update={"intake_max_backlog": 3})
    app = create_app(small, client=refusing_client(temporal_env))

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        responses = [await http.post("/notify", json=ping()) for _ in range(5)]
        ready = await http.get("/readyz")

    assert [r.status_code for r in responses] == [200, 200, 200, 503, 503]
    assert responses[3].headers["retry-after"] == "7"
    assert responses[3].json()["error"] == (
        "The webhook holds 3 notifications that Temporal has not accepted yet, "
        "as many as it may; try again later."
    )
    assert ready.status_code == 503
    assert ready.json()["error"] == "the intake log is full"
    assert ready.json()["intake"]["backlog"] == 3
    assert sample(app, "mirrorflow_webhook_rejections_total", reason="intake_full") == 2


async def test_intake_forwards_what_was_left_at_the_next_start(
    settings: Settings,
    temporal_env: WorkflowEnvironment,
    temporal_client: Client,
    task_queue: str,
) -> None:
    refused = create_app(settings, client=refusing_client(temporal_env))
    async with serving(refused) as url, httpx.AsyncClient(base_url=url) as http:
        responses = [await http.post("/notify", json=ping()) for _ in range(5)]
        left = (await http.get("/readyz")).json()

    app = create_app(settings, client=temporal_client)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        ready = await drained(http)

    acknowledged = {r.json()["workflow_id"] for r in responses}
    runs = await runs_once_visible(temporal_client, task_queue, acknowledged)
    assert [r.status_code for r in responses] == [200] * 5
    assert left["intake"]["backlog"] == 5
    assert left["intake"]["oldest_age_seconds"] > 0
    assert ready["intake"] == {
        "backlog": 0,
        "backlog_bytes": 0,
        "oldest_age_seconds": 0.0,
    }
    assert runs == dict.fromkeys(acknowledged, 1)


async def test_intake_metrics_show_backlog_and_its_age(
    settings: Settings, temporal_env: WorkflowEnvironment
) -> None:
    app = create_app(settings, client=refusing_client(temporal_env))

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        await http.post("/notify", json=ping())
        await asyncio.sleep(0.2)
        text = (await http.get("/metrics")).text

    assert "mirrorflow_intake_backlog 1.0" in text
    assert "mirrorflow_intake_appended_total 1.0" in text
    assert sample(app, "mirrorflow_intake_oldest_age_seconds") >= 0.2
    assert sample(app, "mirrorflow_intake_forward_failures_total") >= 1


async def test_intake_log_belongs_to_one_process(tmp_path: Path) -> None:
    path = tmp_path / "intake.db"
    first = IntakeLog(path, max_rows=10, max_bytes=10_000, metrics=WebhookMetrics())
    second = IntakeLog(path, max_rows=10, max_bytes=10_000, metrics=WebhookMetrics())
    await first.open()
    try:
        with pytest.raises(IntakeError) as caught:
            await second.open()
    finally:
        await first.close()

    assert "is in use by another process" in str(caught.value)
    assert "MIRRORFLOW_INTAKE_PATH" in str(caught.value)


@pytest.mark.slow
async def test_intake_acknowledges_while_temporal_is_stopped(
    settings: Settings, tmp_path: Path
) -> None:
    """Pings keep getting 200 while Temporal is down; each ends as one run."""
    server = DevServer(tmp_path / "temporal.db")
    await server.start()
    client = await server.connect()
    app = create_app(settings, client=client)
    statuses: list[int] = []
    acknowledged: set[str] = set()

    async def stream(http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            response = await http.post("/notify", json=ping())
            statuses.append(response.status_code)
            if response.status_code == 200:
                acknowledged.add(response.json()["workflow_id"])
            await asyncio.sleep(0.02)

    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
            senders = asyncio.gather(
                *(stream(http, time.monotonic() + 9) for _ in range(4))
            )
            await asyncio.sleep(1.5)
            await server.stop()
            await asyncio.sleep(4)
            during = (await http.get("/readyz")).json()
            await server.start()
            await senders
            ready = await drained(http, within=40)
        runs = await runs_once_visible(
            client, settings.temporal_task_queue, acknowledged
        )
    finally:
        await server.close()

    assert set(statuses) == {200}
    assert during["status"] == "ready"
    assert during["temporal"] != "serving"
    assert during["intake"]["backlog"] > 0
    assert ready["intake"]["backlog"] == 0
    assert runs == dict.fromkeys(acknowledged, 1)


async def test_intake_webhook_starts_while_temporal_is_down(
    settings: Settings, tmp_path: Path
) -> None:
    """A webhook started before Temporal acknowledges, and forwards once it is up."""
    server = DevServer(tmp_path / "temporal.db")
    app = create_app(settings.model_copy(update={"temporal_address": server.address}))

    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
            answers = [await http.post("/notify", json=ping()) for _ in range(5)]
            before = (await http.get("/readyz")).json()
            await server.start()
            ready = await drained(http, within=40)
        acknowledged = {answer.json()["workflow_id"] for answer in answers}
        runs = await runs_once_visible(
            await server.connect(), settings.temporal_task_queue, acknowledged
        )
    finally:
        await server.close()

    assert [answer.status_code for answer in answers] == [200] * 5
    assert before["status"] == "ready"
    assert before["temporal"] != "serving"
    assert before["intake"]["backlog"] == 5
    assert ready["intake"]["backlog"] == 0
    assert runs == dict.fromkeys(acknowledged, 1)


def _environment(**variables: str) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORFLOW_")}
    settings = {f"MIRRORFLOW_{name.upper()}": v for name, v in variables.items()}

    return {**kept, "MIRRORFLOW_LOG_FORMAT": "json", **settings}


class WebhookProcess:
    """``mirrorflow webhook`` as a child process that a test may SIGKILL."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the webhook and wait until it answers; it logs to webhook.log."""
        with (self.cwd / "webhook.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mirrorflow",
                "webhook",
                "--host=127.0.0.1",
                f"--port={self.port}",
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(base_url=self.url) as http:
            while True:
                try:
                    await http.get("/healthz")
                except httpx.TransportError:
                    assert self.process.returncode is None, "the webhook exited"
                    assert time.monotonic() < deadline, "the webhook never answered"
                    await asyncio.sleep(0.05)
                else:
                    return

    async def kill(self) -> None:
        """SIGKILL the webhook and wait until it is gone."""
        assert self.process is not None
        self.process.kill()
        await asyncio.wait_for(self.process.wait(), 10)

    async def terminate(self) -> int:
        """SIGTERM the webhook; return its exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

        return await asyncio.wait_for(self.process.wait(), 15)


async def _send_until_gone(url: str, acknowledged: set[str], limit: int) -> int:
    """Post pings until the webhook goes away; return how many were answered."""
    answered = 0
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        for _ in range(limit):
            try:
                response = await http.post("/notify", json=ping())
            except httpx.TransportError:
                break
            answered += 1
            assert response.status_code == 200, response.text
            acknowledged.add(response.json()["workflow_id"])

    return answered


@pytest.mark.slow
async def test_intake_keeps_every_acknowledged_ping_across_sigkills(
    tmp_path: Path,
    temporal_env: WorkflowEnvironment,
    task_queue: str,
    suite_secrets: SecretRegistry,
) -> None:
    """SIGKILL the webhook mid-stream, again and again: no 200 is ever lost."""
    seed = random.randrange(2**32)
    chooser = random.Random(seed)
    env = _environment(
        temporal_address=temporal_env.client.service_client.config.target_host,
        temporal_task_queue=task_queue,
        intake="log",
        intake_path=str(tmp_path / "intake.db"),
        check_sender="false",
    )
    acknowledged: set[str] = set()

    for _ in range(4):
        webhook = WebhookProcess(tmp_path, env)
        await webhook.start()
        senders = asyncio.gather(
            *(_send_until_gone(webhook.url, acknowledged, 5_000) for _ in range(16))
        )
        # Kill at a random point measured in acknowledgements, not in time, so
        # a slow machine goes through as much of the log as a fast one.
        target = len(acknowledged) + chooser.randrange(30, 300)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(acknowledged) >= target:
                break
            await asyncio.sleep(0.001)
        await webhook.kill()
        await senders

    webhook = WebhookProcess(tmp_path, env)
    await webhook.start()
    try:
        async with httpx.AsyncClient(base_url=webhook.url) as http:
            ready = await drained(http)
    finally:
        await webhook.terminate()

    runs = await runs_once_visible(temporal_env.client, task_queue, acknowledged)
    # The verify token of every ping must be in neither, deleted rows included.
    for name in ("webhook.log", "intake.db", "intake.db-wal"):
        if (tmp_path / name).exists():
            suite_secrets.observe(
                f"the killed webhook's {name}", (tmp_path / name).read_bytes()
            )
    assert len(acknowledged) >= 4 * 30, f"seed {seed}"
    assert ready["intake"]["backlog"] == 0, f"seed {seed}"
    assert acknowledged - runs.keys() == set(), f"seed {seed}"
    assert max(runs.values()) == 1, f"seed {seed}"


async def test_intake_backlog_age_skips_rows_already_forwarded(tmp_path: Path) -> None:
    """A row Temporal accepted leaves the age at once, before its delete commits."""
    intake = IntakeLog(
        tmp_path / "intake.db", max_rows=10, max_bytes=10_000, metrics=WebhookMetrics()
    )
    await intake.open()
    try:
        for _ in range(2):
            notification = parse_notification(json.dumps(ping()).encode())
            await intake.append(
                workflow_id_for(notification), canonical_json(notification)
            )
            await asyncio.sleep(0.2)
        first, second = await intake.read_after(0, 10)

        intake.mark_forwarded(first)
        before = time.time()
        one_left = await intake.backlog()
        after = time.time()
        intake.mark_forwarded(second)
        none_left = await intake.backlog()
    finally:
        await intake.close()

    assert one_left.rows == 1
    assert before - second.arrived <= one_left.oldest_age <= after - second.arrived
    assert none_left.rows == 0
    assert none_left.oldest_age == 0.0


async def forward_pings(
    tmp_path: Path, start: StartWorkflow, count: int, **options: Any
) -> set[str]:
    """Log ``count`` pings, forward them with ``start``; return their ids."""
    intake = IntakeLog(
        tmp_path / "intake.db",
        max_rows=1000,
        max_bytes=10_000_000,
        metrics=WebhookMetrics(),
    )
    await intake.open()
    notifications = [
        parse_notification(json.dumps(ping()).encode()) for _ in range(count)
    ]
    await asyncio.gather(
        *(intake.append(workflow_id_for(n), canonical_json(n)) for n in notifications)
    )
    forwarder = Forwarder(intake, start, metrics=WebhookMetrics(), **options)
    forwarder.start()
    try:
        for _ in range(600):
            if not intake.rows:
                break
            await asyncio.sleep(0.05)
    finally:
        await forwarder.stop()
        await intake.close()

    return {workflow_id_for(notification) for notification in notifications}


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
async def test_forwarder_starts_one_at_a_time_while_the_webhook_is_busy(
    temporal_client: Client, task_queue: str, tmp_path: Path, busy: bool
) -> None:
    """A busy webhook keeps one start in flight; every row is still forwarded."""
    in_flight = most_in_flight = 0

    async def start(notification: Notification, workflow_id: str) -> bool:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await temporal_client.start_workflow(
                WORKFLOW_NAME, notification, id=workflow_id, task_queue=task_queue
            )
        finally:
            in_flight -= 1
        return True

    expected = await forward_pings(
        tmp_path, start, 40, concurrency=8, busy=lambda: busy
    )

    runs = await runs_once_visible(temporal_client, task_queue, expected)
    assert set(runs) == expected
    assert set(runs.values()) == {1}
    if busy:
        assert most_in_flight == 1
    else:
        assert most_in_flight > 1


async def test_forwarder_keeps_to_its_rate(
    temporal_client: Client, task_queue: str, tmp_path: Path
) -> None:
    """With a rate, the forwarder keeps to it; every row is still forwarded."""
    rate = 20.0
    begun: list[float] = []

    async def start(notification: Notification, workflow_id: str) -> bool:
        begun.append(time.monotonic())
        await temporal_client.start_workflow(
            WORKFLOW_NAME, notification, id=workflow_id, task_queue=task_queue
        )
        return True

    expected = await forward_pings(tmp_path, start, 12, concurrency=8, rate=rate)

    runs = await runs_once_visible(temporal_client, task_queue, expected)
    assert set(runs) == expected
    assert set(runs.values()) == {1}
    # Turns are kept on a grid: a start that began late does not push the
    # ones after it back, so single gaps vary, but the k-th start never
    # comes before the k-th turn (half a turn allowed for the timestamps,
    # taken once the start's task runs).
    since_first = [when - begun[0] for when in begun]
    assert len(begun) == len(expected)
    assert all(elapsed >= (k - 0.5) / rate for k, elapsed in enumerate(since_first)), (
        since_first
    )
