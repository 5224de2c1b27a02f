"""The whole path: emulator → webhook → Temporal → worker → storage."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client, WorkflowHandle

from activities.storage import open_storage
from activities.subscribers import SubscriberStore
from emulator.content import generated_chunks
from emulator.testing import EmulatorAdmin
from mirrorflow.settings import Settings
from mirrorflow.subscribing import add_subscriber
from tests.fixtures.pipeline import Pipeline, pipeline_settings
from tests.fixtures.secrets import SecretRegistry
from tests.fixtures.servers import free_port, serving
from tests.test_pipeline import activity_starts, wait_for_activity
from webhook.app import create_app
from workflows.models import NotificationResult, Outcome


async def wait_for_objects(pipeline: Pipeline, count: int) -> list[str]:
    """Return the stored names once ``count`` objects are there."""
    deadline = time.monotonic() + 60
    while len(names := pipeline.storage.list()) < count:
        assert time.monotonic() < deadline, f"only {names} were stored"
        await asyncio.sleep(0.2)

    return names


async def test_shared_photo_travels_from_glass_to_storage(
    pipeline: Pipeline, temporal_client: Client, tmp_path: Path
) -> None:
    """A share on the emulator is delivered to the webhook and ends stored."""
    app = create_app(
        pipeline.settings.model_copy(
            update={"temporal_task_queue": pipeline.task_queue}
        ),
        client=temporal_client,
    )
    photo = pipeline.remember(os.urandom(300_000))
    user = pipeline.emulator.create_user()

    async with serving(app) as url:
        settings = pipeline.settings.model_copy(
            update={"callback_url": f"{url}/notify"}
        )
        await asyncio.to_thread(
            add_subscriber, settings, "glass-user", user.credentials
        )
        shared = pipeline.emulator.share(user, photo)
        [name] = await wait_for_objects(pipeline, 1)

    [delivery] = pipeline.emulator.deliveries(user=user)
    assert delivery["statusCode"] == 200
    assert delivery["body"]["userActions"] == [{"type": "SHARE"}]
    assert shared["item"]["id"] in name
    assert pipeline.storage.read(name) == photo


@contextmanager
def worker_process(
    settings: Settings, address: str, task_queue: str, **variables: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``mirrorflow worker`` as a child process with these settings."""
    env = {
        **os.environ,
        "MIRRORFLOW_TEMPORAL_ADDRESS": address,
        "MIRRORFLOW_TEMPORAL_TASK_QUEUE": task_queue,
        "MIRRORFLOW_MIRROR_ROOT_URL": settings.mirror_root_url,
        "MIRRORFLOW_STORAGE_URL": settings.storage_url,
        "MIRRORFLOW_DATABASE_URL": settings.database_url,
        "MIRRORFLOW_LOG_LEVEL": "WARNING",
        "MIRRORFLOW_GRACEFUL_SHUTDOWN": "1",
        **variables,
    }
    child = subprocess.Popen([sys.executable, "-m", "mirrorflow", "worker"], env=env)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=30)


def process_pipeline(
    temporal_client: Client, task_queue: str, emulator: EmulatorAdmin, tmp_path: Path
) -> Pipeline:
    """Return a pipeline whose worker the test runs as a child process."""
    settings = pipeline_settings(emulator, tmp_path)

    return Pipeline(
        client=temporal_client,
        task_queue=task_queue,
        settings=settings,
        emulator=emulator,
        storage=open_storage(settings.storage_url),
        subscribers=SubscriberStore(settings.database_path),
    )


async def test_run_survives_its_worker_being_killed(
    temporal_client: Client,
    task_queue: str,
    emulator: EmulatorAdmin,
    tmp_path: Path,
) -> None:
    """A worker SIGKILLed mid-store is replaced; one object, identical bytes."""
    pipeline = process_pipeline(temporal_client, task_queue, emulator, tmp_path)
    settings = pipeline.settings
    subscribed = pipeline.subscribe()
    size = 20_000_000
    shared = emulator.share(
        subscribed.user, content_type="video/mp4", generated_size=size, seed="kill"
    )
    content_path = shared["attachment"]["contentUrl"].split("/", 3)[3]
    emulator.add_fault(content_path, latency=5.0, times=1)
    address = temporal_client.service_client.config.target_host

    with worker_process(settings, address, task_queue) as first:
        handle: WorkflowHandle[object, NotificationResult] = await pipeline.start(
            subscribed.notification(shared["item"]["id"], "SHARE")
        )
        await wait_for_activity(handle, "store")
        first.send_signal(signal.SIGKILL)
        first.wait()
    with worker_process(settings, address, task_queue):
        result = await handle.result()

    expected = hashlib.sha256()
    for chunk in generated_chunks("kill", 0, size):
        expected.update(chunk)
    assert result.outcome is Outcome.STORED
    [stored] = result.stored
    assert stored.sha256 == expected.hexdigest()
    assert pipeline.storage.list() == [stored.name]
    assert hashlib.sha256(pipeline.storage.read(stored.name)).hexdigest() == (
        expected.hexdigest()
    )
    await pipeline.check_histories()


@pytest.mark.parametrize(
    ("graceful", "attempts"), [(30, 1), (1, 2)], ids=["finishes", "hands_over"]
)
async def test_worker_told_to_stop_mid_store_loses_nothing(
    temporal_client: Client,
    task_queue: str,
    emulator: EmulatorAdmin,
    tmp_path: Path,
    graceful: int,
    attempts: int,
) -> None:
    """SIGTERM mid-store: the attempt ends within the graceful period, or is
    cancelled and retried by the next worker; either way one object is stored.
    """
    pipeline = process_pipeline(temporal_client, task_queue, emulator, tmp_path)
    settings = pipeline.settings
    subscribed = pipeline.subscribe()
    shared = emulator.share(
        subscribed.user, content_type="video/mp4", generated_size=1_000_000, seed="stop"
    )
    content_path = shared["attachment"]["contentUrl"].split("/", 3)[3]
    emulator.add_fault(content_path, latency=4.0, times=1)
    address = temporal_client.service_client.config.target_host

    with worker_process(
        settings, address, task_queue, MIRRORFLOW_GRACEFUL_SHUTDOWN=str(graceful)
    ) as first:
        handle: WorkflowHandle[object, NotificationResult] = await pipeline.start(
            subscribed.notification(shared["item"]["id"], "SHARE")
        )
        await wait_for_activity(handle, "store")
        first.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(first.wait, 60)
    with worker_process(settings, address, task_queue):
        result = await handle.result()

    [store] = await activity_starts(handle, "store")
    assert exit_code == 0
    assert store.attempt == attempts
    if attempts > 1:
        # The SDK's own failure, not a Mirror error made of the cancellation.
        assert store.last_failure.application_failure_info.type == "WorkerShutdown"
    assert result.outcome is Outcome.STORED
    assert pipeline.storage.list() == [result.stored[0].name]
    await pipeline.check_histories()


async def test_worker_serves_sdk_metrics_for_prometheus(
    temporal_client: Client,
    task_queue: str,
    emulator: EmulatorAdmin,
    tmp_path: Path,
    suite_secrets: SecretRegistry,
) -> None:
    settings = pipeline_settings(emulator, tmp_path)
    address = temporal_client.service_client.config.target_host
    port = free_port()

    with worker_process(
        settings, address, task_queue, MIRRORFLOW_WORKER_METRICS_PORT=str(port)
    ):
        text = ""
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            # Client metrics come first; the task queue's once the worker polls.
            while f'task_queue="{task_queue}"' not in text:
                assert time.monotonic() < deadline, (
                    f"the worker served no metrics of its task queue:\n{text}"
                )
                await asyncio.sleep(0.2)
                with contextlib.suppress(httpx.HTTPError):
                    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text

    suite_secrets.observe("the worker's /metrics", text)
    assert "temporal_worker_task_slots_available" in text
