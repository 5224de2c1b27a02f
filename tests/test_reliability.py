"""A 200 is a promise: faults in every component, and what each run makes of them.

Every test here runs the real components: the Temporal dev server, the
worker (in process, or as ``mirrorflow worker`` when it is to be killed), the
webhook over HTTP, the Mirror emulator with injected faults, and storage.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from temporalio.api.enums.v1 import TimeoutType
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowFailureError
from temporalio.converter import DefaultFailureConverter
from temporalio.exceptions import ActivityError, ApplicationError

from activities.storage import Storage, open_storage
from activities.subscribers import SubscriberStore
from emulator.testing import EmulatorAdmin, EmulatorUser
from mirrorflow.settings import Settings
from mirrorflow.subscribing import add_subscriber
from mirrorflow.temporal import DATA_CONVERTER, FAILURE_BUDGET
from tests.fixtures.pipeline import (
    Pipeline,
    Subscribed,
    pipeline_settings,
    run_pipeline,
)
from tests.fixtures.secrets import SecretRegistry
from tests.fixtures.servers import serving
from tests.test_pipeline import activity_starts, wait_for_activity
from tests.test_webhook import DevServer
from webhook.app import create_app
from webhook.notifications import notification_from
from workflows.models import ErrorType, NotificationResult, Outcome, workflow_id_for

PHOTO = b"\xff\xd8\xff\xe0" + os.urandom(100_000) + b"\xff\xd9"

MIRROR_TIMEOUT = 2.5
"""Seconds per Mirror call in these tests, so that 8 s of latency times out."""


@pytest.fixture
async def fault_pipeline(
    temporal_client: Client, task_queue: str, emulator: EmulatorAdmin, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    """Run a worker whose Mirror calls give up after a few seconds."""
    settings = pipeline_settings(
        emulator,
        tmp_path,
        mirror_timeout=MIRROR_TIMEOUT,
    )
    async for running in run_pipeline(temporal_client, task_queue, emulator, settings):
        yield running


def fault_path(call: str, shared: dict[str, Any]) -> str:
    """Return the regular expression of the path one pipeline call requests."""
    item = re.escape(shared["item"]["id"])
    attachment = re.escape(shared["attachment"]["id"])
    paths = {
        "fetch_item": f"^/mirror/v1/timeline/{item}$",
        "fetch_attachment": f"^/mirror/v1/timeline/{item}/attachments/{attachment}$",
        "content": f"^{re.escape(urlsplit(shared['attachment']['contentUrl']).path)}$",
        # A new subscriber has no access token: fetch_item asks for the first.
        "token": "^/oauth2/v4/token$",
    }

    return paths[call]


ACTIVITY_OF_CALL = {
    "fetch_item": "fetch_item",
    "fetch_attachment": "fetch_attachment",
    "content": "store",
    "token": "fetch_item",
}
"""The activity that makes each call."""

TRANSIENT_FAULTS = {
    "500": {"status": 500},
    "503": {"status": 503},
    "429": {"status": 429},
    "drop": {"drop": True},
    "8s": {"latency": 8.0},
}

TRANSIENT_TABLE = [
    pytest.param(call, fault, id=f"{call}-{name}")
    for call in ACTIVITY_OF_CALL
    for name, fault in TRANSIENT_FAULTS.items()
] + [pytest.param("content", {"drop_after_bytes": 30_000}, id="content-cut")]


def share_photo(pipeline: Pipeline) -> tuple[Subscribed, dict[str, Any]]:
    """Subscribe a new user and have them share a photo of their own."""
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))

    return subscribed, shared


def fault_hits(emulator: EmulatorAdmin, fault_id: str) -> int:
    """Return how many requests a fault has met."""
    [fault] = [fault for fault in emulator.faults() if fault["id"] == fault_id]
    hits: int = fault["hits"]

    return hits


def _fail_deep(depth: int) -> None:
    if depth == 0:
        raise ConnectionResetError("connection reset by peer")
    _fail_deeper(depth - 1)


def _fail_deeper(depth: int) -> None:
    # Two functions in turn, as Python folds a run of one repeated frame.
    _fail_deep(depth)


def test_failures_fit_what_the_server_keeps_whole() -> None:
    """A deep traceback loses its outer frames, not its message or type."""
    small = ApplicationError("small", type=ErrorType.MIRROR_UNAVAILABLE)
    try:
        try:
            _fail_deep(80)
        except ConnectionResetError as exc:
            raise ApplicationError(
                "Mirror is unavailable for user 'u': connection reset by peer",
                type=ErrorType.MIRROR_UNAVAILABLE,
            ) from exc
    except ApplicationError as caught:
        deep = caught
    converter = DATA_CONVERTER.failure_converter
    failures = {}
    for name, error in {"small": small, "deep": deep}.items():
        failures[name] = Failure()
        converter.to_failure(error, DATA_CONVERTER.payload_converter, failures[name])
    untrimmed = Failure()
    DefaultFailureConverter().to_failure(
        deep, DATA_CONVERTER.payload_converter, untrimmed
    )

    trimmed = failures["deep"]
    cause = trimmed.cause.stack_trace.splitlines()
    assert untrimmed.ByteSize() > 4096
    assert trimmed.ByteSize() <= FAILURE_BUDGET
    assert trimmed.message == untrimmed.message
    assert trimmed.application_failure_info == untrimmed.application_failure_info
    assert trimmed.cause.message == "connection reset by peer"
    assert re.fullmatch(r"  \.\.\. \d+ lines cut", cause[0])
    assert cause[1:] == untrimmed.cause.stack_trace.splitlines()[-(len(cause) - 1) :]
    assert 'raise ConnectionResetError("connection reset by peer")' in cause[-1]
    small_untouched = Failure()
    DefaultFailureConverter().to_failure(
        small, DATA_CONVERTER.payload_converter, small_untouched
    )
    assert failures["small"] == small_untouched


@pytest.mark.parametrize(("call", "fault"), TRANSIENT_TABLE)
async def test_pipeline_retries_a_transient_fault_of_each_mirror_call(
    fault_pipeline: Pipeline, call: str, fault: dict[str, Any]
) -> None:
    """One failed call is retried as a new attempt; the photo is stored once."""
    subscribed, shared = share_photo(fault_pipeline)
    fault_id = fault_pipeline.emulator.add_fault(
        fault_path(call, shared), times=1, **fault
    )

    handle = await fault_pipeline.start(
        subscribed.notification(shared["item"]["id"], "SHARE")
    )
    result = await handle.result()

    assert fault_hits(fault_pipeline.emulator, fault_id) == 1
    assert result.outcome is Outcome.STORED
    [stored] = result.stored
    assert fault_pipeline.storage.list() == [stored.name]
    assert fault_pipeline.storage.read(stored.name) == PHOTO
    [started] = await activity_starts(handle, ACTIVITY_OF_CALL[call])
    assert started.attempt == 2
    # Whole: the server wraps a last failure over 4 KiB, message and all.
    failure = started.last_failure
    assert failure.message.startswith("Mirror is unavailable for user")
    assert failure.application_failure_info.type == ErrorType.MIRROR_UNAVAILABLE
    assert not failure.application_failure_info.non_retryable


@pytest.mark.parametrize(
    ("call", "fault", "outcome"),
    [
        pytest.param("fetch_item", {"status": 404}, Outcome.GONE, id="fetch_item-404"),
        pytest.param(
            "fetch_attachment", {"status": 404}, Outcome.GONE, id="fetch_attachment-404"
        ),
        pytest.param("content", {"status": 404}, Outcome.GONE, id="content-404"),
        pytest.param("fetch_item", {"status": 410}, Outcome.GONE, id="fetch_item-410"),
    ],
)
async def test_pipeline_ends_gone_when_mirror_no_longer_has_it(
    fault_pipeline: Pipeline, call: str, fault: dict[str, Any], outcome: Outcome
) -> None:
    """A 404 is an answer, not a failure: one attempt, nothing stored."""
    subscribed, shared = share_photo(fault_pipeline)
    fault_pipeline.emulator.add_fault(fault_path(call, shared), **fault)

    handle = await fault_pipeline.start(
        subscribed.notification(shared["item"]["id"], "SHARE")
    )
    result = await handle.result()

    assert result.outcome is outcome
    assert fault_pipeline.storage.list() == []
    [started] = await activity_starts(handle, ACTIVITY_OF_CALL[call])
    assert started.attempt == 1


@pytest.mark.parametrize(
    ("call", "fault", "error_type"),
    [
        pytest.param(
            "fetch_item",
            {"status": 400},
            ErrorType.MIRROR_CLIENT_ERROR,
            id="fetch_item-400",
        ),
        pytest.param(
            "content", {"status": 403}, ErrorType.MIRROR_CLIENT_ERROR, id="content-403"
        ),
        pytest.param(
            "token", {"status": 400}, ErrorType.MIRROR_CLIENT_ERROR, id="token-400"
        ),
    ],
)
async def test_pipeline_fails_at_once_when_mirror_refuses_the_request(
    fault_pipeline: Pipeline, call: str, fault: dict[str, Any], error_type: str
) -> None:
    """A refusal no retry can change fails the run after one attempt."""
    subscribed, shared = share_photo(fault_pipeline)
    fault_pipeline.emulator.add_fault(fault_path(call, shared), **fault)

    handle = await fault_pipeline.start(
        subscribed.notification(shared["item"]["id"], "SHARE")
    )
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()

    assert isinstance(caught.value.cause, ActivityError)
    failure = caught.value.cause.cause
    assert isinstance(failure, ApplicationError)
    assert failure.type == error_type
    assert failure.non_retryable
    [started] = await activity_starts(handle, ACTIVITY_OF_CALL[call])
    assert started.attempt == 1
    assert fault_pipeline.storage.list() == []


async def test_pipeline_refreshes_a_token_that_expires_mid_download(
    fault_pipeline: Pipeline,
) -> None:
    """An access token that expires between fetching and downloading is refreshed."""
    subscribed, shared = share_photo(fault_pipeline)
    content = fault_path("content", shared)
    fault_pipeline.emulator.add_fault(content, latency=1.5, times=1)

    handle = await fault_pipeline.start(
        subscribed.notification(shared["item"]["id"], "SHARE")
    )
    await wait_for_activity(handle, "store")
    mark = fault_pipeline.emulator.mark()
    fault_pipeline.emulator.expire_tokens(subscribed.user)
    result: NotificationResult = await handle.result()

    calls = [
        (call["path"], call["status"])
        for call in fault_pipeline.emulator.requests(after=mark, user=subscribed.user)
    ]
    content_path = urlsplit(shared["attachment"]["contentUrl"]).path
    assert calls == [
        (content_path, 401),
        ("/oauth2/v4/token", 200),
        (content_path, 200),
    ]
    assert result.outcome is Outcome.STORED
    [started] = await activity_starts(handle, "store")
    assert started.attempt == 1


async def test_pipeline_fails_a_grant_revoked_mid_download(
    fault_pipeline: Pipeline,
) -> None:
    """A grant revoked after the item was fetched fails the run, unretried."""
    subscribed, shared = share_photo(fault_pipeline)
    fault_pipeline.emulator.add_fault(
        fault_path("content", shared), latency=1.5, times=1
    )

    handle = await fault_pipeline.start(
        subscribed.notification(shared["item"]["id"], "SHARE")
    )
    await wait_for_activity(handle, "store")
    fault_pipeline.emulator.revoke(subscribed.user)
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()

    assert isinstance(caught.value.cause, ActivityError)
    failure = caught.value.cause.cause
    assert isinstance(failure, ApplicationError)
    assert failure.type == ErrorType.GRANT_REVOKED
    assert repr(subscribed.user_token) in failure.message
    [started] = await activity_starts(handle, "store")
    assert started.attempt == 1
    assert fault_pipeline.storage.list() == []


# A worker that stops by itself when the test process goes away: it reads its
# standard input until the end, which comes when the parent's pipe closes.
_WORKER = """
import os, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(3)), daemon=True).start()
from mirrorflow.cli import main
sys.exit(main(["worker"]))
"""


@contextmanager
def worker_process(
    settings: Settings, address: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``mirrorflow worker`` with these settings, logging at DEBUG into ``log``."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORFLOW_")}
    env = {
        **kept,
        "MIRRORFLOW_TEMPORAL_ADDRESS": address,
        "MIRRORFLOW_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        "MIRRORFLOW_MIRROR_ROOT_URL": settings.mirror_root_url,
        "MIRRORFLOW_MIRROR_TIMEOUT": str(settings.mirror_timeout),
        "MIRRORFLOW_STORAGE_URL": settings.storage_url,
        "MIRRORFLOW_DATABASE_URL": settings.database_url,
        "MIRRORFLOW_LOG_LEVEL": "DEBUG",
        "MIRRORFLOW_LOG_FORMAT": "json",
        "MIRRORFLOW_GRACEFUL_SHUTDOWN": "1",
    }
    with log.open("ab") as output:
        child = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            env=env,
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=30)
        assert child.stdin is not None
        child.stdin.close()


def acknowledged(emulator: EmulatorAdmin, users: list[EmulatorUser]) -> dict[str, str]:
    """Return the workflow id of each item whose notification was answered 200."""
    return {
        attempt["body"]["itemId"]: workflow_id_for(notification_from(attempt["body"]))
        for user in users
        for attempt in emulator.deliveries(user=user)
        if attempt["statusCode"] == 200
    }


async def wait_for_acknowledged(
    emulator: EmulatorAdmin, users: list[EmulatorUser], count: int
) -> dict[str, str]:
    """Wait until the webhook has answered 200 to ``count`` notifications."""
    deadline = time.monotonic() + 30
    while len(ids := acknowledged(emulator, users)) < count:
        assert time.monotonic() < deadline, f"only {len(ids)} were acknowledged"
        await asyncio.sleep(0.1)

    return ids


async def wait_for_objects(storage: Storage, count: int) -> list[str]:
    """Return the stored names once ``count`` objects are there."""
    deadline = time.monotonic() + 60
    while len(names := storage.list()) < count:
        assert time.monotonic() < deadline, f"only {names} were stored"
        await asyncio.sleep(0.1)

    return names


def register_secrets(
    registry: SecretRegistry,
    emulator: EmulatorAdmin,
    users: list[EmulatorUser],
    subscribers: SubscriberStore,
) -> None:
    """Register the users' refresh, access and verify tokens with the registry."""
    for user in users:
        registry.add(user.credentials["refresh_token"])
        for attempt in emulator.deliveries(user=user):
            registry.add(attempt["body"].get("verifyToken"))
    for subscriber in subscribers.list():
        registry.add(subscriber.credentials.get("token"))


async def test_acknowledged_batch_survives_its_worker_being_killed(
    temporal_client: Client,
    task_queue: str,
    emulator: EmulatorAdmin,
    tmp_path: Path,
    suite_secrets: SecretRegistry,
) -> None:
    """Every notification answered 200 is stored once, across a SIGKILLed worker.

    Shares reach the webhook over HTTP from the emulator in three waves:
    stored before the kill, caught mid-store by it, and acknowledged while no
    worker runs at all.
    """
    settings = pipeline_settings(
        emulator,
        tmp_path,
        temporal_task_queue=task_queue,
    )
    storage = open_storage(settings.storage_url)
    address = temporal_client.service_client.config.target_host
    app = create_app(settings, client=temporal_client)
    users = [emulator.create_user() for _ in range(3)]
    photos: dict[str, bytes] = {}

    def share(user: EmulatorUser, *, latency: float | None = None) -> str:
        photo = os.urandom(50_000)
        shared = emulator.share(user, photo)
        if latency is not None:
            content = urlsplit(shared["attachment"]["contentUrl"]).path
            emulator.add_fault(f"^{re.escape(content)}$", latency=latency, times=1)
        item_id: str = shared["item"]["id"]
        photos[item_id] = photo
        return item_id

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        subscribing = settings.model_copy(update={"callback_url": f"{url}/notify"})
        for user in users:
            token = f"batch-{uuid.uuid4().hex[:8]}"
            await asyncio.to_thread(
                add_subscriber, subscribing, token, user.credentials
            )

        with worker_process(settings, address, tmp_path / "worker-1.log") as first:
            for user in users:
                share(user)
            await wait_for_objects(storage, 3)
            slow = [share(user, latency=10.0) for user in [*users, users[0]]]
            ids = await wait_for_acknowledged(emulator, users, 7)
            for item_id in slow:
                handle = temporal_client.get_workflow_handle(ids[item_id])
                await wait_for_activity(handle, "store")
            first.send_signal(signal.SIGKILL)
            first.wait()

        for user in users:
            share(user)
        ids = await wait_for_acknowledged(emulator, users, 10)
        with worker_process(settings, address, tmp_path / "worker-2.log"):
            handles = {
                item_id: temporal_client.get_workflow_handle(
                    workflow_id, result_type=NotificationResult
                )
                for item_id, workflow_id in ids.items()
            }
            results = {item: await handle.result() for item, handle in handles.items()}
        metrics = (await http.get("/metrics")).text

    register_secrets(
        suite_secrets, emulator, users, SubscriberStore(settings.database_path)
    )
    suite_secrets.observe("the batch webhook's /metrics", metrics)
    for log in ("worker-1.log", "worker-2.log"):
        suite_secrets.observe(log, (tmp_path / log).read_bytes())
    deliveries = [
        attempt for user in users for attempt in emulator.deliveries(user=user)
    ]
    assert [attempt["statusCode"] for attempt in deliveries] == [200] * 10
    assert {result.outcome for result in results.values()} == {Outcome.STORED}
    stored = {item: result.stored for item, result in results.items()}
    assert storage.list() == sorted(entry.name for [entry] in stored.values())
    for item_id, [entry] in stored.items():
        assert storage.read(entry.name) == photos[item_id]
    for item_id in slow:
        [started] = await activity_starts(handles[item_id], "store")
        assert started.attempt == 2
        assert started.last_failure.timeout_failure_info.timeout_type == (
            TimeoutType.TIMEOUT_TYPE_HEARTBEAT
        )


async def test_runs_in_flight_survive_a_temporal_restart(
    emulator: EmulatorAdmin, tmp_path: Path, suite_secrets: SecretRegistry
) -> None:
    """Runs resume after Temporal restarts; while it is down nothing gets a 200.

    Three stores are under way when the file-backed dev server stops. Two
    photos shared while it is down are refused with 503, resent by the
    emulator, and accepted once it is back.
    """
    server = DevServer(tmp_path / "temporal.db")
    await server.start()
    client = await server.connect()
    task_queue = f"restart-{uuid.uuid4().hex[:8]}"
    settings = pipeline_settings(
        emulator,
        tmp_path,
        temporal_task_queue=task_queue,
        start_deadline=1.0,
    )
    storage = open_storage(settings.storage_url)
    app = create_app(settings, client=client)
    users = [emulator.create_user() for _ in range(2)]
    emulator.configure(delivery_backoff=1.0, delivery_attempts=8)
    photos: dict[str, bytes] = {}

    def share(user: EmulatorUser, *, latency: float | None = None) -> str:
        photo = os.urandom(50_000)
        shared = emulator.share(user, photo)
        if latency is not None:
            content = urlsplit(shared["attachment"]["contentUrl"]).path
            emulator.add_fault(f"^{re.escape(content)}$", latency=latency, times=1)
        item_id: str = shared["item"]["id"]
        photos[item_id] = photo
        return item_id

    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
            subscribing = settings.model_copy(update={"callback_url": f"{url}/notify"})
            for user in users:
                token = f"restart-{uuid.uuid4().hex[:8]}"
                await asyncio.to_thread(
                    add_subscriber, subscribing, token, user.credentials
                )
            with worker_process(settings, server.address, tmp_path / "worker.log"):
                in_flight = [share(user, latency=8.0) for user in [*users, users[0]]]
                ids = await wait_for_acknowledged(emulator, users, 3)
                for item_id in in_flight:
                    handle = client.get_workflow_handle(ids[item_id])
                    await wait_for_activity(handle, "store")

                await server.stop()
                while_down = [share(user) for user in users]
                direct = [
                    await http.post(
                        "/notify", json=await delivered_body(emulator, item)
                    )
                    for item in while_down
                ]
                ready = await http.get("/readyz")
                await server.start()

                ids = await wait_for_acknowledged(emulator, users, 5)
                results = {
                    item: await client.get_workflow_handle(
                        workflow_id, result_type=NotificationResult
                    ).result()
                    for item, workflow_id in ids.items()
                }
            metrics = (await http.get("/metrics")).text
    finally:
        await server.close()

    register_secrets(
        suite_secrets, emulator, users, SubscriberStore(settings.database_path)
    )
    suite_secrets.observe("the restart webhook's /metrics", metrics)
    suite_secrets.observe("worker.log", (tmp_path / "worker.log").read_bytes())
    assert [response.status_code for response in direct] == [503, 503]
    assert ready.status_code == 503
    for item_id in while_down:
        statuses = [
            attempt["statusCode"]
            for user in users
            for attempt in emulator.deliveries(user=user)
            if attempt["body"]["itemId"] == item_id
        ]
        assert statuses[0] == 503
        assert statuses[-1] == 200
    assert {result.outcome for result in results.values()} == {Outcome.STORED}
    stored = {item: result.stored for item, result in results.items()}
    assert storage.list() == sorted(entry.name for [entry] in stored.values())
    for item_id, [entry] in stored.items():
        assert storage.read(entry.name) == photos[item_id]


async def delivered_body(emulator: EmulatorAdmin, item_id: str) -> dict[str, Any]:
    """Return the notification body the emulator sent about an item, once sent."""
    deadline = time.monotonic() + 10
    while True:
        for attempt in emulator.deliveries():
            if attempt["body"]["itemId"] == item_id:
                body: dict[str, Any] = attempt["body"]
                return body
        assert time.monotonic() < deadline, f"nothing was sent about {item_id!r}"
        await asyncio.sleep(0.05)
