"""NotificationWorkflow end to end: real Temporal, the emulator, real storage."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import ActivityTaskStartedEventAttributes
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ActivityError, ApplicationError

from emulator.testing import EmulatorAdmin
from tests.fixtures.pipeline import (
    Pipeline,
    pipeline_settings,
    record,
    run_pipeline,
)
from tests.fixtures.storage import FakeGcsServer
from workflows.models import OUTCOME, ErrorType, NotificationResult, Outcome

PHOTO = b"\xff\xd8\xff\xe0" + os.urandom(200_000) + b"\xff\xd9"


async def activity_starts(
    handle: WorkflowHandle[Any, Any], name: str
) -> list[ActivityTaskStartedEventAttributes]:
    """Return the started events of an activity in a run's history.

    Temporal records one started event per scheduled activity, when its last
    attempt ends: its ``attempt`` counts the attempts made, and its
    ``last_failure`` is the failure of the attempt before.
    """
    scheduled: dict[int, str] = {}
    starts = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            scheduled[event.event_id] = attributes.activity_type.name
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            if scheduled.get(started.scheduled_event_id) == name:
                starts.append(started)

    return starts


async def activity_attempts(handle: WorkflowHandle[Any, Any], name: str) -> int:
    """Return how many attempts the last run of an activity in a history made."""
    starts = await activity_starts(handle, name)

    return max((started.attempt for started in starts), default=0)


async def outcome_attribute(handle: WorkflowHandle[object, object]) -> str | None:
    """Return the MirrorOutcome search attribute a run carries."""
    description = await handle.describe()

    return description.typed_search_attributes.get(OUTCOME)


async def wait_for_activity(
    handle: WorkflowHandle[object, object], name: str, *, attempt: int = 1
) -> None:
    """Wait until an activity of the run has reached an attempt, pending."""
    for _ in range(300):
        description = await handle.describe()
        for pending in description.raw_description.pending_activities:
            if pending.activity_type.name == name and pending.attempt >= attempt:
                if attempt == 1 and pending.last_started_time.seconds == 0:
                    continue
                return
        await asyncio.sleep(0.1)
    pytest.fail(f"activity {name!r} never reached attempt {attempt}")


async def test_pipeline_stores_shared_photo_with_identical_bytes(
    pipeline: Pipeline,
) -> None:
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    item_id = shared["item"]["id"]

    handle = await pipeline.start(subscribed.notification(item_id, "SHARE"))
    result = await handle.result()
    await record(pipeline, handle, "stored")

    assert result.outcome is Outcome.STORED
    assert await outcome_attribute(handle) == "stored"
    [stored] = result.stored
    assert stored.name.endswith(".jpg")
    assert stored.size == len(PHOTO)
    assert stored.sha256 == hashlib.sha256(PHOTO).hexdigest()
    assert pipeline.storage.read(stored.name) == PHOTO


async def test_pipeline_stores_every_attachment_of_an_item(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    item = pipeline.emulator.add_item(subscribed.user, text="three things")
    contents = {
        "image/jpeg": pipeline.remember(os.urandom(5_000)),
        "image/png": pipeline.remember(os.urandom(7_000)),
        "video/mp4": pipeline.remember(os.urandom(9_000)),
    }
    for content_type, content in contents.items():
        pipeline.emulator.add_attachment(
            subscribed.user, item["id"], content, content_type=content_type
        )

    result = await pipeline.run(subscribed.notification(item["id"], "SHARE"))

    assert result.outcome is Outcome.STORED
    assert sorted(stored.content_type for stored in result.stored) == sorted(contents)
    for stored in result.stored:
        assert pipeline.storage.read(stored.name) == contents[stored.content_type]


async def test_pipeline_waits_for_a_processing_video(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    video = pipeline.remember(os.urandom(50_000))
    shared = pipeline.emulator.share(
        subscribed.user, video, content_type="video/mp4", processing_seconds=3
    )

    handle = await pipeline.start(
        subscribed.notification(shared["item"]["id"], "SHARE")
    )
    result = await handle.result()
    await record(pipeline, handle, "stored-after-processing")

    assert result.outcome is Outcome.STORED
    [stored] = result.stored
    assert stored.name.endswith(".mp4")
    assert pipeline.storage.read(stored.name) == video
    assert await activity_attempts(handle, "fetch_attachment") > 1


async def test_pipeline_ends_gone_for_a_deleted_item(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    item_id = shared["item"]["id"]
    pipeline.emulator.act(subscribed.user, item_id, "DELETE")

    handle = await pipeline.start(subscribed.notification(item_id, "SHARE"))
    result = await handle.result()
    await record(pipeline, handle, "gone")

    assert result.outcome is Outcome.GONE
    assert await outcome_attribute(handle) == "gone"
    assert pipeline.storage.list() == []


async def test_pipeline_rejects_a_spoofed_notification_without_calling_mirror(
    pipeline: Pipeline,
) -> None:
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    mark = pipeline.emulator.mark()
    spoofed = subscribed.notification(
        shared["item"]["id"], "SHARE", verify_token="guessed"
    )

    handle = await pipeline.start(spoofed)
    result = await handle.result()
    await record(pipeline, handle, "rejected")

    assert result.outcome is Outcome.REJECTED
    assert await outcome_attribute(handle) == "rejected"
    assert pipeline.emulator.requests(after=mark) == []
    assert pipeline.storage.list() == []


async def test_pipeline_rejects_an_unknown_user_token(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    pipeline.subscribers.remove(subscribed.user_token)
    mark = pipeline.emulator.mark()

    result = await pipeline.run(subscribed.notification("any-item", "SHARE"))

    assert result.outcome is Outcome.REJECTED
    assert result.detail == "unknown user token"
    assert pipeline.emulator.requests(after=mark) == []


async def test_pipeline_fails_a_revoked_user_without_retrying(
    pipeline: Pipeline,
) -> None:
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    pipeline.emulator.revoke(subscribed.user)

    handle = await pipeline.start(
        subscribed.notification(shared["item"]["id"], "SHARE")
    )
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    await record(pipeline, handle, "revoked")

    activity_error = caught.value.cause
    assert isinstance(activity_error, ActivityError)
    failure = activity_error.cause
    assert isinstance(failure, ApplicationError)
    assert failure.type == ErrorType.GRANT_REVOKED
    assert failure.non_retryable
    assert repr(subscribed.user_token) in failure.message
    assert await activity_attempts(handle, "fetch_item") == 1
    # A failed run has no outcome; ExecutionStatus = 'Failed' finds it.
    assert await outcome_attribute(handle) is None


async def test_pipeline_refreshes_an_expired_access_token(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    first = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    await pipeline.run(subscribed.notification(first["item"]["id"], "SHARE"))
    saved = pipeline.subscribers.get(subscribed.user_token).credentials["token"]
    pipeline.emulator.expire_tokens(subscribed.user)
    second = pipeline.emulator.share(subscribed.user, pipeline.remember(os.urandom(99)))

    result = await pipeline.run(subscribed.notification(second["item"]["id"], "SHARE"))

    assert result.outcome is Outcome.STORED
    refreshed = pipeline.subscribers.get(subscribed.user_token).credentials["token"]
    assert refreshed != saved


async def test_pipeline_retries_mirror_errors_then_stores(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    item_id = shared["item"]["id"]
    pipeline.emulator.add_fault(f"/mirror/v1/timeline/{item_id}$", status=503, times=1)
    pipeline.emulator.add_fault(f"/timeline/{item_id}/attachments/", drop=True, times=1)

    handle = await pipeline.start(subscribed.notification(item_id, "SHARE"))
    result = await handle.result()

    assert result.outcome is Outcome.STORED
    assert await activity_attempts(handle, "fetch_item") == 2
    assert await activity_attempts(handle, "fetch_attachment") == 2


async def test_pipeline_delete_removes_what_was_stored(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    item_id = shared["item"]["id"]
    stored = await pipeline.run(subscribed.notification(item_id, "SHARE"))
    pipeline.emulator.act(subscribed.user, item_id, "DELETE")

    handle = await pipeline.start(
        subscribed.notification(item_id, "DELETE", operation="DELETE")
    )
    removed = await handle.result()
    await record(pipeline, handle, "removed")

    assert stored.outcome is Outcome.STORED
    assert removed.outcome is Outcome.REMOVED
    assert removed.removed == tuple(entry.name for entry in stored.stored)
    assert not pipeline.storage.exists(stored.stored[0].name)


async def test_pipeline_delete_racing_a_store_leaves_nothing(
    pipeline: Pipeline,
) -> None:
    subscribed = pipeline.subscribe()
    shared = pipeline.emulator.share(subscribed.user, pipeline.remember(PHOTO))
    item_id = shared["item"]["id"]
    content_path = shared["attachment"]["contentUrl"].split("/", 3)[3]
    pipeline.emulator.add_fault(content_path, latency=3.0, times=1)

    storing = await pipeline.start(subscribed.notification(item_id, "SHARE"))
    await wait_for_activity(storing, "store")
    removed = await pipeline.run(
        subscribed.notification(item_id, "DELETE", operation="DELETE")
    )
    stored = await storing.result()

    assert removed.outcome is Outcome.REMOVED
    assert stored.outcome is Outcome.GONE
    assert [name for name in pipeline.storage.list() if "/timeline/" in name] == []


async def test_pipeline_stores_the_latest_location_as_json(pipeline: Pipeline) -> None:
    subscribed = pipeline.subscribe()
    fix = pipeline.emulator.add_location(subscribed.user, 48.8584, 2.2945)

    handle = await pipeline.start(
        subscribed.notification("latest", collection="locations")
    )
    result = await handle.result()
    await record(pipeline, handle, "stored-location")

    assert result.outcome is Outcome.STORED
    [stored] = result.stored
    assert stored.content_type == "application/json"
    assert fix["location"]["id"] in stored.name
    assert b"48.8584" in pipeline.storage.read(stored.name)


@pytest.mark.parametrize(
    ("collection", "operation", "actions", "detail"),
    [
        pytest.param("timeline", "UPDATE", ("PIN",), "PIN", id="pin"),
        pytest.param("timeline", "UPDATE", ("TELEPORT",), "TELEPORT", id="unknown"),
        pytest.param("settings", "UPDATE", (), "'settings'", id="collection"),
    ],
)
async def test_pipeline_ignores_what_it_does_not_process(
    pipeline: Pipeline,
    collection: str,
    operation: str,
    actions: tuple[str, ...],
    detail: str,
) -> None:
    subscribed = pipeline.subscribe()
    mark = pipeline.emulator.mark()

    handle = await pipeline.start(
        subscribed.notification(
            "some-item", *actions, collection=collection, operation=operation
        )
    )
    result = await handle.result()
    await record(pipeline, handle, f"ignored-{'-'.join((collection, *actions))}")

    assert result.outcome is Outcome.IGNORED
    assert detail in result.detail
    assert pipeline.emulator.requests(after=mark) == []


@pytest.fixture
async def gcs_pipeline(
    temporal_client: Client,
    task_queue: str,
    emulator: EmulatorAdmin,
    fake_gcs: FakeGcsServer,
    tmp_path: Path,
) -> AsyncIterator[Pipeline]:
    """Run a worker that stores into a bucket of the GCS emulator."""
    bucket = fake_gcs.create_bucket()
    settings = pipeline_settings(emulator, tmp_path, f"gs://{bucket}/attachments")
    async for running in run_pipeline(temporal_client, task_queue, emulator, settings):
        yield running


async def test_pipeline_rides_out_a_storage_outage(
    gcs_pipeline: Pipeline, fake_gcs: FakeGcsServer
) -> None:
    subscribed = gcs_pipeline.subscribe()
    shared = gcs_pipeline.emulator.share(subscribed.user, gcs_pipeline.remember(PHOTO))

    with fake_gcs.stopped():
        handle = await gcs_pipeline.start(
            subscribed.notification(shared["item"]["id"], "SHARE")
        )
        await wait_for_activity(handle, "store", attempt=2)
    result: NotificationResult = await handle.result()

    assert result.outcome is Outcome.STORED
    [stored] = result.stored
    assert gcs_pipeline.storage.read(stored.name) == PHOTO
    assert gcs_pipeline.storage.list() == [stored.name]


async def test_pipeline_gives_up_on_a_video_that_never_finishes_processing(
    temporal_client: Client, task_queue: str, emulator: EmulatorAdmin, tmp_path: Path
) -> None:
    settings = pipeline_settings(emulator, tmp_path, processing_timeout=4.0)
    async for pipeline in run_pipeline(temporal_client, task_queue, emulator, settings):
        subscribed = pipeline.subscribe()
        shared = pipeline.emulator.share(
            subscribed.user,
            pipeline.remember(os.urandom(1_000)),
            content_type="video/mp4",
            processing_seconds=600,
        )

        handle = await pipeline.start(
            subscribed.notification(shared["item"]["id"], "SHARE")
        )
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()

        activity_error = caught.value.cause
        assert isinstance(activity_error, ActivityError)
        failure = activity_error.cause
        assert isinstance(failure, ApplicationError)
        assert failure.type == ErrorType.PROCESSING_TIMED_OUT
        assert "MIRRORFLOW_PROCESSING_TIMEOUT" in failure.message
        assert await activity_attempts(handle, "fetch_attachment") > 1
        assert pipeline.storage.list() == []


async def test_worker_starts_activities_no_faster_than_mirror_calls_per_second(
    temporal_client: Client, task_queue: str, emulator: EmulatorAdmin, tmp_path: Path
) -> None:
    """Four runs of four activities at 2 per second: no second holds more than 4."""
    rate = 2
    settings = pipeline_settings(
        emulator,
        tmp_path,
        mirror_calls_per_second=rate,
    )
    async for pipeline in run_pipeline(temporal_client, task_queue, emulator, settings):
        notifications = []
        for _ in range(4):
            subscribed = pipeline.subscribe()
            shared = pipeline.emulator.share(
                subscribed.user, pipeline.remember(os.urandom(1_000))
            )
            notifications.append(subscribed.notification(shared["item"]["id"], "SHARE"))
        handles = [await pipeline.start(n) for n in notifications]
        results = await asyncio.gather(*(handle.result() for handle in handles))
        started = sorted(
            [time for handle in handles for time in await activity_start_times(handle)]
        )

    assert [result.outcome for result in results] == [Outcome.STORED] * 4
    assert len(started) == 16
    # The limit lets a burst of up to one second's worth through at once.
    busiest = max(sum(1 for t in started if s <= t < s + 1) for s in started)
    assert busiest <= 2 * rate, [round(t - started[0], 3) for t in started]


async def activity_start_times(handle: WorkflowHandle[Any, Any]) -> list[float]:
    """Return when each activity of a run started, in seconds since the epoch."""
    return [
        event.event_time.ToMicroseconds() / 1e6
        async for event in handle.fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
