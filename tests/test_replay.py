"""Tests of ``mirrorflow replay``: which runs it re-runs, which it skips, and why.

The runs belong to a stand-in registered under ``NotificationWorkflow``'s name.
Whether a run fails is up to the world its one activity looks at: an item can
be broken (the activity fails for good) or held (it waits to be released), so
a test can let a run fail first and succeed once it is re-run.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import (
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from mirrorflow.errors import MirrorflowError
from mirrorflow.replay import (
    ProgressBar,
    ReplaySummary,
    build_query,
    parse_moment,
    quote,
    replay_failed,
)
from workflows.models import (
    USER_TOKEN,
    WORKFLOW_NAME,
    Notification,
    NotificationResult,
    Outcome,
    search_attributes_for,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ALICE = "alice"


class World:
    """What the stand-in's activity meets: broken items and held items."""

    def __init__(self) -> None:
        self.broken: set[str] = set()
        self.held: set[str] = set()
        self.released = asyncio.Event()

    @activity.defn(name="look_at_item")
    async def look_at_item(self, item_id: str) -> None:
        """Wait while the item is held, then fail if it is broken."""
        if item_id in self.held:
            await self.released.wait()
        if item_id in self.broken:
            raise ApplicationError(f"item {item_id} is broken", non_retryable=True)


@workflow.defn(name=WORKFLOW_NAME)
class StandInWorkflow:
    """Stand in for ``NotificationWorkflow``: one activity, then stored."""

    @workflow.run
    async def run(self, notification: Notification) -> NotificationResult:
        """Look at the item once; fail when the activity does."""
        await workflow.execute_activity(
            "look_at_item",
            notification.item_id,
            start_to_close_timeout=timedelta(seconds=30),
        )

        return NotificationResult(outcome=Outcome.STORED)


@pytest.fixture
async def world(temporal_client: Client, task_queue: str) -> AsyncIterator[World]:
    """Run a worker for the stand-in on the test's task queue."""
    world = World()
    async with Worker(
        temporal_client,
        task_queue=task_queue,
        workflows=[StandInWorkflow],
        activities=[world.look_at_item],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        yield world
        world.released.set()


def make_notification(
    *, user_token: str = ALICE, collection: str = "timeline"
) -> Notification:
    """Return a notification of an item of its own."""
    return Notification(
        collection=collection,
        item_id=f"item-{uuid.uuid4().hex[:8]}",
        operation="INSERT",
        user_token=user_token,
    )


async def run_notification(
    client: Client, task_queue: str, notification: Notification, workflow_id: str
) -> WorkflowExecutionStatus:
    """Run the notification under ``workflow_id`` to its end; return its status."""
    handle = await client.start_workflow(
        WORKFLOW_NAME,
        notification,
        id=workflow_id,
        task_queue=task_queue,
        result_type=NotificationResult,
        search_attributes=search_attributes_for(notification),
        static_summary=f"{notification.collection} {notification.item_id}",
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
    )
    try:
        await handle.result()
    except WorkflowFailureError:
        return WorkflowExecutionStatus.FAILED

    return WorkflowExecutionStatus.COMPLETED


async def fail_runs(
    client: Client, task_queue: str, world: World, notifications: list[Notification]
) -> list[str]:
    """Run each notification into a failure; return the workflow ids."""
    workflow_ids = []
    for notification in notifications:
        world.broken.add(notification.item_id)
        workflow_id = f"replay-test-{notification.item_id}"
        status = await run_notification(client, task_queue, notification, workflow_id)
        assert status == WorkflowExecutionStatus.FAILED
        workflow_ids.append(workflow_id)

    return workflow_ids


async def wait_until_listed(client: Client, task_queue: str, count: int) -> None:
    """Poll visibility, which lags behind, until it lists ``count`` failed runs."""
    query = build_query(query=on_queue(task_queue))
    for _ in range(100):
        listed = await client.count_workflows(query)
        if listed.count >= count:
            return
        await asyncio.sleep(0.1)

    pytest.fail(f"visibility never listed {count} runs for {query!r}")


async def latest_input(client: Client, workflow_id: str) -> Notification:
    """Return the input of the id's latest run, read from its history."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    attributes = history.events[0].workflow_execution_started_event_attributes
    [notification] = await client.data_converter.decode(
        attributes.input.payloads, [Notification]
    )
    assert isinstance(notification, Notification)

    return notification


def on_queue(task_queue: str) -> str:
    """Return the raw query that keeps a replay to the test's own runs."""
    return f"TaskQueue = {quote(task_queue)}"


# The query builder and the moment parser: pure functions.


def test_quote_escapes_single_quotes_and_backslashes() -> None:
    assert quote("o'brien") == r"'o\'brien'"
    assert quote("back\\slash") == r"'back\\slash'"
    assert quote("x' OR 'a'='a") == r"'x\' OR \'a\'=\'a'"


def test_build_query_selects_failed_notification_runs() -> None:
    query = build_query()

    assert query == (
        "WorkflowType = 'NotificationWorkflow' AND (ExecutionStatus = 'Failed' "
        "OR ExecutionStatus = 'TimedOut' OR ExecutionStatus = 'Terminated')"
    )


def test_build_query_windows_on_start_time_in_utc() -> None:
    since = datetime(2026, 3, 1, 13, 0, tzinfo=UTC) + timedelta(microseconds=5)
    until = datetime(2026, 3, 2)

    query = build_query(since=since, until=until)

    assert "StartTime >= '2026-03-01T13:00:00.000005Z'" in query
    assert "StartTime < '2026-03-02T00:00:00.000000Z'" in query


def test_build_query_quotes_the_user_token() -> None:
    query = build_query(user_token="o'brien' OR WorkflowType != '")

    assert query.endswith(r"AND MirrorUserToken = 'o\'brien\' OR WorkflowType != \''")


def test_build_query_ands_the_raw_query_in_parentheses() -> None:
    query = build_query(query="MirrorCollection = 'a' OR MirrorCollection = 'b'")

    assert query.endswith("AND (MirrorCollection = 'a' OR MirrorCollection = 'b')")


@pytest.mark.parametrize(
    ("since", "until"),
    [
        pytest.param(NOW, NOW, id="same-moment"),
        pytest.param(NOW, NOW - timedelta(hours=1), id="reversed"),
    ],
)
def test_build_query_refuses_an_empty_window(since: datetime, until: datetime) -> None:
    with pytest.raises(MirrorflowError, match="window is empty"):
        build_query(since=since, until=until)


def test_build_query_refuses_a_blank_raw_query() -> None:
    with pytest.raises(MirrorflowError, match="blank"):
        build_query(query="  ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("30m", NOW - timedelta(minutes=30), id="minutes"),
        pytest.param("24h", NOW - timedelta(hours=24), id="hours"),
        pytest.param("7d", NOW - timedelta(days=7), id="days"),
        pytest.param("1d12h", NOW - timedelta(hours=36), id="combined"),
        pytest.param(
            "2026-02-01T08:30:00Z", datetime(2026, 2, 1, 8, 30, tzinfo=UTC), id="utc"
        ),
        pytest.param(
            "2026-02-01T08:30:00+02:00",
            datetime(2026, 2, 1, 6, 30, tzinfo=UTC),
            id="offset",
        ),
        pytest.param(
            "2026-02-01 08:30", datetime(2026, 2, 1, 8, 30, tzinfo=UTC), id="naive"
        ),
    ],
)
def test_parse_moment_reads_durations_and_timestamps(
    text: str, expected: datetime
) -> None:
    moment = parse_moment(text, now=NOW)

    assert moment == expected
    assert moment.tzinfo is not None


@pytest.mark.parametrize("text", ["", "24", "h", "-3h", "yesterday", "3 days"])
def test_parse_moment_names_the_forms_it_reads(text: str) -> None:
    with pytest.raises(MirrorflowError, match=r"Expected a duration such as '30m'"):
        parse_moment(text)


def test_progress_bar_writes_few_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, total=40, label="replay")

    for _ in range(40):
        bar.advance("started 1")
    bar.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[-1] == "replay [########################] 40/40 started 1"


# Replays against the dev server.


async def test_replay_reruns_each_failed_run_once_with_its_input(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    """Failed runs are re-run once, as the latest run of their id."""
    failing = [make_notification(), make_notification()]
    failed_ids = await fail_runs(temporal_client, task_queue, world, failing)
    completed = make_notification()
    completed_id = f"replay-test-{completed.item_id}"
    await run_notification(temporal_client, task_queue, completed, completed_id)
    await wait_until_listed(temporal_client, task_queue, 2)
    world.broken.clear()
    progress = io.StringIO()

    summary = await replay_failed(
        temporal_client, query=on_queue(task_queue), progress=progress
    )

    assert sorted(run.workflow_id for run in summary.started) == sorted(failed_ids)
    assert summary.skipped == []
    assert summary.errors == []
    assert "replay [" in progress.getvalue()
    inputs = dict(zip(failed_ids, failing, strict=True))
    for run in summary.started:
        handle = temporal_client.get_workflow_handle(
            run.workflow_id, result_type=NotificationResult
        )
        result = await handle.result()
        latest = await handle.describe()
        assert result.outcome == Outcome.STORED
        assert latest.run_id == run.new_run_id != run.failed_run_id
        assert latest.task_queue == task_queue
        assert latest.typed_search_attributes.get(USER_TOKEN) == ALICE
        assert (await latest.static_summary() or "").startswith("Replay: ")
        assert (
            await latest_input(temporal_client, run.workflow_id)
            == (inputs[run.workflow_id])
        )


async def test_replay_skips_an_id_whose_later_run_completed(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    """An old failed run is not re-run once a later run of its id completed."""
    notification = make_notification()
    [workflow_id] = await fail_runs(temporal_client, task_queue, world, [notification])
    world.broken.clear()
    await run_notification(temporal_client, task_queue, notification, workflow_id)
    await wait_until_listed(temporal_client, task_queue, 1)

    summary = await replay_failed(temporal_client, query=on_queue(task_queue))

    assert summary.started == []
    assert [(s.workflow_id, s.reason) for s in summary.skipped] == [
        (workflow_id, "a later run completed")
    ]


async def test_replay_dry_run_starts_nothing(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    failed_ids = await fail_runs(
        temporal_client, task_queue, world, [make_notification()]
    )
    await wait_until_listed(temporal_client, task_queue, 1)
    before = await temporal_client.get_workflow_handle(failed_ids[0]).describe()

    summary = await replay_failed(
        temporal_client, query=on_queue(task_queue), dry_run=True
    )

    after = await temporal_client.get_workflow_handle(failed_ids[0]).describe()
    assert [run.workflow_id for run in summary.started] == failed_ids
    assert summary.started[0].new_run_id is None
    assert after.run_id == before.run_id
    assert after.status == WorkflowExecutionStatus.FAILED
    assert "would re-run" in summary.render()


async def test_replay_filters_by_user_token(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    """Only the given user's runs are re-run, even when the token has a quote."""
    quoted_user = make_notification(user_token="o'brien")
    [quoted_id, _] = await fail_runs(
        temporal_client,
        task_queue,
        world,
        [quoted_user, make_notification(user_token="bob")],
    )
    await wait_until_listed(temporal_client, task_queue, 2)

    summary = await replay_failed(
        temporal_client,
        user_token="o'brien",
        query=on_queue(task_queue),
        dry_run=True,
    )

    assert [run.workflow_id for run in summary.started] == [quoted_id]


async def test_replay_ands_the_raw_query(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    location = make_notification(collection="locations")
    [location_id, _] = await fail_runs(
        temporal_client, task_queue, world, [location, make_notification()]
    )
    await wait_until_listed(temporal_client, task_queue, 2)

    summary = await replay_failed(
        temporal_client,
        query=f"{on_queue(task_queue)} AND MirrorCollection = 'locations'",
        dry_run=True,
    )

    assert [run.workflow_id for run in summary.started] == [location_id]
    assert summary.matched_runs == 1


async def test_replay_windows_on_start_time(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    await fail_runs(temporal_client, task_queue, world, [make_notification()])
    await wait_until_listed(temporal_client, task_queue, 1)

    later = await replay_failed(
        temporal_client,
        since=datetime.now(UTC),
        query=on_queue(task_queue),
        dry_run=True,
    )
    earlier = await replay_failed(
        temporal_client,
        since=datetime.now(UTC) - timedelta(minutes=5),
        until=datetime.now(UTC),
        query=on_queue(task_queue),
        dry_run=True,
    )

    assert later.started == []
    assert len(earlier.started) == 1


async def test_replay_twice_at_once_starts_each_id_once(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    """Two replays racing start one run per id; the loser says why it skipped."""
    notifications = [make_notification() for _ in range(3)]
    failed_ids = await fail_runs(temporal_client, task_queue, world, notifications)
    await wait_until_listed(temporal_client, task_queue, 3)
    world.broken.clear()
    world.held.update(notification.item_id for notification in notifications)

    first, second = await asyncio.gather(
        replay_failed(temporal_client, query=on_queue(task_queue)),
        replay_failed(temporal_client, query=on_queue(task_queue)),
    )
    third = await replay_failed(temporal_client, query=on_queue(task_queue))
    world.released.set()

    started = [run.workflow_id for run in first.started + second.started]
    assert sorted(started) == sorted(failed_ids)
    assert {s.reason for s in first.skipped + second.skipped} == {"already running"}
    assert third.started == []
    assert {s.reason for s in third.skipped} == {"already running"}
    for workflow_id in failed_ids:
        await temporal_client.get_workflow_handle(workflow_id).result()


def test_summary_renders_one_line_per_id() -> None:
    summary = ReplaySummary(query="q", dry_run=False, matched_runs=0)

    assert summary.render().splitlines() == [
        "query: q",
        "0 matching runs of 0 workflow ids",
        "re-ran 0, skipped 0, errors 0",
    ]


async def test_replay_command_reruns_timed_out_and_terminated_runs(
    temporal_client: Client, task_queue: str, world: World
) -> None:
    """`mirrorflow replay`, run as an operator runs it, re-runs both kinds."""
    timed_out, terminated = make_notification(), make_notification()
    world.held.update([timed_out.item_id, terminated.item_id])
    ids = {
        name: f"replay-test-{notification.item_id}"
        for name, notification in (("timed_out", timed_out), ("terminated", terminated))
    }
    for name, notification in (("timed_out", timed_out), ("terminated", terminated)):
        await temporal_client.start_workflow(
            WORKFLOW_NAME,
            notification,
            id=ids[name],
            task_queue=task_queue,
            search_attributes=search_attributes_for(notification),
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            execution_timeout=(timedelta(seconds=1) if name == "timed_out" else None),
        )
    await temporal_client.get_workflow_handle(ids["terminated"]).terminate("test")
    for _ in range(100):
        statuses = {
            name: (await temporal_client.get_workflow_handle(i).describe()).status
            for name, i in ids.items()
        }
        if statuses["timed_out"] == WorkflowExecutionStatus.TIMED_OUT:
            break
        await asyncio.sleep(0.1)
    assert statuses == {
        "timed_out": WorkflowExecutionStatus.TIMED_OUT,
        "terminated": WorkflowExecutionStatus.TERMINATED,
    }
    await wait_until_listed(temporal_client, task_queue, 2)
    world.released.set()
    address = temporal_client.service_client.config.target_host
    env = {
        **os.environ,
        "MIRRORFLOW_TEMPORAL_ADDRESS": address,
        "MIRRORFLOW_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "mirrorflow", "replay", "--since", "1h"]

    replay = await asyncio.to_thread(
        subprocess.run,
        [*command, "--query", on_queue(task_queue)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert replay.returncode == 0, replay.stderr
    assert f"re-ran {ids['timed_out']} (TimedOut run" in replay.stdout
    assert f"re-ran {ids['terminated']} (Terminated run" in replay.stdout
    assert "re-ran 2, skipped 0, errors 0" in replay.stdout
    for workflow_id in ids.values():
        handle = temporal_client.get_workflow_handle(
            workflow_id, result_type=NotificationResult
        )
        assert (await handle.result()).outcome == Outcome.STORED
