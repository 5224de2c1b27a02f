"""Re-run the notification runs that failed, timed out or were terminated.

:func:`replay_failed` lists such runs of ``NotificationWorkflow`` with a
visibility query, then re-runs each workflow id at most once.

**What is selected.** Runs whose status is Failed, TimedOut or Terminated,
narrowed by a time window on ``StartTime`` (the moment the webhook accepted the
notification, so "the notifications that arrived during the outage"), by
``MirrorUserToken``, and by a raw visibility query; all filters are ANDed. A
run that arrived before the window but failed inside it is not selected: pass
``CloseTime >= '...'`` as the raw query for that. Canceled runs are never
selected: someone stopped them on purpose.

**Only the latest run counts.** Visibility lists runs, not workflows: an old
failed run still matches after a later run of the same id completed. So each
id is described without a run id, which answers with its latest run, and is
skipped when that run is running ("already running"), completed ("a later run
completed") or canceled.

**How a run is re-run.** By starting a new run of the same workflow id with
the input recorded in the latest run's ``WorkflowExecutionStarted`` event,
on the same task queue, with the same search attributes and timeouts, and a
static summary that marks it as a replay. A reset to the first workflow task
(``ResetWorkflowExecution``) would do much the same, but a new start is the
better fit here:

- The server enforces the skip rules at the moment of the start, not only
  when this module looked: ``ALLOW_DUPLICATE_FAILED_ONLY`` refuses the start
  if a run of the id completed meanwhile, and ``id_conflict_policy=FAIL``
  refuses it if one is running, so two operators replaying at once, or a
  Mirror resend arriving during the replay, never make two runs.
- A reset has no such guard; it acts on the run it is given.
- The new run is started exactly the way the webhook starts one, so it runs
  on today's workflow code with nothing carried over from the failed run's
  history, and shows in the UI as a run of its own, found by the same search
  attributes.

The failed run stays in history untouched; the new run's details name it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TextIO

from google.protobuf.duration_pb2 import Duration
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
)
from temporalio.common import (
    RetryPolicy,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from mirrorflow.errors import MirrorflowError, TemporalUnavailable
from workflows.models import (
    USER_TOKEN,
    WORKFLOW_NAME,
    Notification,
    NotificationResult,
    search_attributes_for,
)

REPLAYED_STATUSES = (
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.TIMED_OUT,
    WorkflowExecutionStatus.TERMINATED,
)
"""The statuses of the runs that replay selects."""

_STATUS_NAMES = {
    WorkflowExecutionStatus.RUNNING: "Running",
    WorkflowExecutionStatus.COMPLETED: "Completed",
    WorkflowExecutionStatus.FAILED: "Failed",
    WorkflowExecutionStatus.CANCELED: "Canceled",
    WorkflowExecutionStatus.TERMINATED: "Terminated",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "ContinuedAsNew",
    WorkflowExecutionStatus.TIMED_OUT: "TimedOut",
}

_DURATION = re.compile(r"(?:\d+[smhdw])+")
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class ReplayedRun:
    """A workflow id that was re-run, or would be in a dry run."""

    workflow_id: str
    failed_run_id: str
    failed_status: str
    """How the re-run run ended: Failed, TimedOut or Terminated."""
    new_run_id: str | None
    """The new run's id; None in a dry run."""


@dataclass(frozen=True)
class SkippedRun:
    """A workflow id that was not re-run, and why."""

    workflow_id: str
    latest_run_id: str
    reason: str


@dataclass(frozen=True)
class ReplayFailure:
    """A workflow id that could not be re-run because of an error."""

    workflow_id: str
    error: str


@dataclass
class ReplaySummary:
    """What a replay found, started, skipped and failed to do."""

    query: str
    """The visibility query that selected the runs."""
    dry_run: bool
    matched_runs: int = 0
    """How many runs the query listed (several may share one workflow id)."""
    started: list[ReplayedRun] = field(default_factory=list)
    """The re-run ids; in a dry run, those that would be re-run."""
    skipped: list[SkippedRun] = field(default_factory=list)
    errors: list[ReplayFailure] = field(default_factory=list)

    @property
    def workflow_ids(self) -> int:
        """Return how many distinct workflow ids were considered."""
        return len(self.started) + len(self.skipped) + len(self.errors)

    def render(self) -> str:
        """Return the summary as the lines an operator reads, one per id."""
        verb = "would re-run" if self.dry_run else "re-ran"
        lines = [
            f"query: {self.query}",
            f"{self.matched_runs} matching runs of {self.workflow_ids} workflow ids",
        ]
        for run in self.started:
            target = f" as run {run.new_run_id}" if run.new_run_id else ""
            lines.append(
                f"{verb} {run.workflow_id} ({run.failed_status} run "
                f"{run.failed_run_id}){target}"
            )
        for skipped in self.skipped:
            lines.append(f"skipped {skipped.workflow_id}: {skipped.reason}")
        for failure in self.errors:
            lines.append(f"error {failure.workflow_id}: {failure.error}")
        lines.append(
            f"{verb} {len(self.started)}, skipped {len(self.skipped)}, "
            f"errors {len(self.errors)}"
        )

        return "\n".join(lines)


def parse_moment(text: str, *, now: datetime | None = None) -> datetime:
    """Return the moment that ``text`` names: a duration ago, or a timestamp.

    Durations count back from ``now`` (the current time by default): ``90s``,
    ``30m``, ``24h``, ``7d``, ``2w``, or combined such as ``1d12h``. Timestamps
    are ISO 8601, such as ``2026-01-31T12:00:00Z``; one without an offset is
    read as UTC, the time Temporal records.

    Raises:
        MirrorflowError: ``text`` is neither a duration nor a timestamp.
    """
    text = text.strip()
    if _DURATION.fullmatch(text):
        seconds = sum(
            int(amount) * _UNIT_SECONDS[unit]
            for amount, unit in _DURATION_PART.findall(text)
        )
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MirrorflowError(
            f"Expected a duration such as '30m', '24h' or '7d', or an ISO 8601 "
            f"timestamp such as '2026-01-31T12:00:00Z'; got {text!r}."
        ) from None

    return _as_utc(moment)


def quote(value: str) -> str:
    """Return ``value`` as a single-quoted visibility query string literal.

    Backslashes and single quotes are escaped, so no value can end the
    literal early and add conditions of its own.
    """
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")

    return f"'{escaped}'"


def build_query(
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    user_token: str | None = None,
    query: str | None = None,
) -> str:
    """Return the visibility query that selects the runs to replay.

    Args:
        since: keep runs started at or after this moment (UTC if naive).
        until: keep runs started before this moment (UTC if naive).
        user_token: keep the runs of this ``MirrorUserToken``.
        query: a raw visibility query, ANDed with the rest in parentheses.

    Raises:
        MirrorflowError: ``until`` is not after ``since``, or ``query`` is blank.
    """
    statuses = " OR ".join(
        f"ExecutionStatus = {quote(_STATUS_NAMES[status])}"
        for status in REPLAYED_STATUSES
    )
    conditions = [f"WorkflowType = {quote(WORKFLOW_NAME)}", f"({statuses})"]

    if since is not None and until is not None and _as_utc(until) <= _as_utc(since):
        raise MirrorflowError(
            f"The window is empty: until ({_timestamp(until)}) is not after since "
            f"({_timestamp(since)}). Swap them or widen the window."
        )
    if since is not None:
        conditions.append(f"StartTime >= {quote(_timestamp(since))}")
    if until is not None:
        conditions.append(f"StartTime < {quote(_timestamp(until))}")
    if user_token is not None:
        conditions.append(f"{USER_TOKEN.name} = {quote(user_token)}")
    if query is not None:
        if not query.strip():
            raise MirrorflowError(
                "The raw query is blank: leave it out, or pass a visibility "
                "query such as \"MirrorCollection = 'timeline'\"."
            )
        conditions.append(f"({query.strip()})")

    return " AND ".join(conditions)


async def replay_failed(
    client: Client,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    user_token: str | None = None,
    query: str | None = None,
    dry_run: bool = False,
    progress: TextIO | None = None,
) -> ReplaySummary:
    """Re-run, once each, the failed notification workflows that match.

    The filters are those of :func:`build_query`. Each workflow id is judged
    by its latest run: it is re-run when that run failed, timed out or was
    terminated, and skipped with a reason otherwise. Errors with one id are
    recorded in the summary and do not stop the others.

    Args:
        client: a client whose data converter decodes :class:`Notification`.
        dry_run: decide and report, but start nothing.
        progress: where to draw a progress bar (redrawn in place on a
            terminal, a few plain lines otherwise); None for silence.

    Raises:
        MirrorflowError: a filter is malformed or Temporal rejected the query.
        TemporalUnavailable: Temporal could not be reached to list the runs.
    """
    full_query = build_query(
        since=since, until=until, user_token=user_token, query=query
    )
    workflow_ids, matched_runs = await _list_failed_runs(client, full_query)
    summary = ReplaySummary(
        query=full_query, dry_run=dry_run, matched_runs=matched_runs
    )

    bar = ProgressBar(progress, total=len(workflow_ids), label="replay")
    verb = "to re-run" if dry_run else "started"
    for workflow_id in workflow_ids:
        outcome = await _replay_one(client, workflow_id, dry_run=dry_run)
        if isinstance(outcome, ReplayedRun):
            summary.started.append(outcome)
        elif isinstance(outcome, SkippedRun):
            summary.skipped.append(outcome)
        else:
            summary.errors.append(outcome)
        bar.advance(
            f"{verb} {len(summary.started)} skipped {len(summary.skipped)} "
            f"errors {len(summary.errors)}"
        )
    bar.close()

    return summary


class ProgressBar:
    """Draw how far a batch has come onto a text stream.

    On a terminal the bar is redrawn in place; elsewhere (a log file, a pipe)
    it writes a line at each tenth of the way, so that logs stay short.
    """

    def __init__(
        self, stream: TextIO | None, *, total: int, label: str, width: int = 24
    ) -> None:
        self._stream = stream
        self._total = total
        self._label = label
        self._width = width
        self._done = 0
        self._last_tenth = 0
        self._on_terminal = stream is not None and stream.isatty()

    def advance(self, status: str = "") -> None:
        """Count one more item done, and redraw with ``status`` beside it."""
        self._done += 1
        if self._stream is None:
            return

        if self._on_terminal:
            self._stream.write("\r" + self._line(status) + "\x1b[K")
            self._stream.flush()
            return

        tenth = self._done * 10 // max(self._total, 1)
        if tenth > self._last_tenth or self._done == self._total:
            self._last_tenth = tenth
            self._stream.write(self._line(status) + "\n")
            self._stream.flush()

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self._stream is not None and self._on_terminal and self._done:
            self._stream.write("\n")
            self._stream.flush()

    def _line(self, status: str) -> str:
        filled = self._width * self._done // max(self._total, 1)
        bar = "#" * filled + "-" * (self._width - filled)
        count = f"{self._done}/{self._total}"

        return f"{self._label} [{bar}] {count} {status}".rstrip()


async def _list_failed_runs(client: Client, query: str) -> tuple[list[str], int]:
    """Return the matching runs' workflow ids, each once, and the runs' count."""
    workflow_ids: dict[str, None] = {}
    matched_runs = 0
    try:
        async for execution in client.list_workflows(query):
            # The query already says this; checking again keeps a raw query
            # that closes its parentheses from reaching other runs.
            if (
                execution.workflow_type != WORKFLOW_NAME
                or execution.status not in REPLAYED_STATUSES
            ):
                continue
            matched_runs += 1
            workflow_ids.setdefault(execution.id)
    except RPCError as exc:
        if exc.status == RPCStatusCode.INVALID_ARGUMENT:
            raise MirrorflowError(
                f"Temporal rejected the visibility query {query!r}: {exc.message}. "
                "Check the raw query's names and quoting."
            ) from exc
        if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
            raise TemporalUnavailable(
                f"Could not list runs from Temporal: {exc.message}. Check that it "
                "is running and MIRRORFLOW_TEMPORAL_ADDRESS points at it."
            ) from exc
        raise

    return list(workflow_ids), matched_runs


async def _replay_one(
    client: Client, workflow_id: str, *, dry_run: bool
) -> ReplayedRun | SkippedRun | ReplayFailure:
    """Re-run one workflow id if its latest run failed; say what happened."""
    try:
        latest = await client.get_workflow_handle(workflow_id).describe()
        reason = _reason_to_skip(latest)
        if reason is not None:
            return SkippedRun(workflow_id, latest.run_id, reason)

        started_event = await _started_event(client, latest)
        notification = await _recorded_input(latest, started_event)
        failed = ReplayedRun(
            workflow_id=workflow_id,
            failed_run_id=latest.run_id,
            failed_status=_status_name(latest.status),
            new_run_id=None,
        )
        if dry_run:
            return failed

        new_run_id = await _start_again(client, latest, started_event, notification)
    except WorkflowAlreadyStartedError:
        return await _skip_after_refusal(client, workflow_id)
    except (RPCError, _UnreadableRun) as exc:
        return ReplayFailure(workflow_id, str(exc))

    return replace(failed, new_run_id=new_run_id)


def _reason_to_skip(latest: WorkflowExecutionDescription) -> str | None:
    """Return why the id's latest run must not be re-run, or None if it may."""
    if latest.workflow_type != WORKFLOW_NAME:
        return f"its latest run is a {latest.workflow_type!r} workflow"
    if latest.status == WorkflowExecutionStatus.RUNNING:
        return "already running"
    if latest.status == WorkflowExecutionStatus.COMPLETED:
        return "a later run completed"
    if latest.status == WorkflowExecutionStatus.CANCELED:
        return "its latest run was canceled; start it by hand if it should run"
    if latest.status not in REPLAYED_STATUSES:
        return f"its latest run is {_status_name(latest.status)}"

    return None


async def _skip_after_refusal(client: Client, workflow_id: str) -> SkippedRun:
    """Explain why Temporal refused the start: someone else got there first."""
    try:
        latest = await client.get_workflow_handle(workflow_id).describe()
    except RPCError:
        return SkippedRun(workflow_id, "", "another run was started meanwhile")

    reason = _reason_to_skip(latest) or "another run was started meanwhile"

    return SkippedRun(workflow_id, latest.run_id, reason)


class _UnreadableRun(Exception):
    """The failed run's history does not say how to start it again."""


async def _started_event(
    client: Client, latest: WorkflowExecutionDescription
) -> HistoryEvent:
    """Return the first event of the run's history, which records its start."""
    handle = client.get_workflow_handle(latest.id, run_id=latest.run_id)
    async for event in handle.fetch_history_events(page_size=1):
        if event.HasField("workflow_execution_started_event_attributes"):
            return event
        break

    raise _UnreadableRun(
        f"run {latest.run_id} has no WorkflowExecutionStarted event first in its "
        "history; it may have been deleted by retention"
    )


async def _recorded_input(
    latest: WorkflowExecutionDescription, started_event: HistoryEvent
) -> Notification:
    """Decode the notification the run was started with."""
    payloads = started_event.workflow_execution_started_event_attributes.input
    if len(payloads.payloads) != 1:
        raise _UnreadableRun(
            f"run {latest.run_id} was started with {len(payloads.payloads)} "
            "arguments; a notification run takes exactly one"
        )
    try:
        [notification] = await latest.data_converter.decode(
            payloads.payloads, [Notification]
        )
    except Exception as exc:
        raise _UnreadableRun(
            f"the input of run {latest.run_id} is not a Notification: {exc}"
        ) from exc

    if not isinstance(notification, Notification):
        raise _UnreadableRun(
            f"the input of run {latest.run_id} decoded to a "
            f"{type(notification).__name__}, not a Notification"
        )

    return notification


async def _start_again(
    client: Client,
    latest: WorkflowExecutionDescription,
    started_event: HistoryEvent,
    notification: Notification,
) -> str:
    """Start a new run of the id as the failed one was started; return its id."""
    started = started_event.workflow_execution_started_event_attributes
    original_summary = await latest.static_summary()
    summary = (
        f"Replay: {original_summary}"
        if original_summary
        else f"Replay: {notification.collection} {notification.operation} "
        f"of item {notification.item_id}"
    )
    status = _status_name(latest.status)

    handle = await client.start_workflow(
        WORKFLOW_NAME,
        notification,
        id=latest.id,
        task_queue=latest.task_queue,
        result_type=NotificationResult,
        execution_timeout=_duration(started.workflow_execution_timeout),
        run_timeout=_duration(started.workflow_run_timeout),
        task_timeout=_duration(started.workflow_task_timeout),
        retry_policy=(
            RetryPolicy.from_proto(started.retry_policy)
            if started.HasField("retry_policy")
            else None
        ),
        search_attributes=search_attributes_for(notification),
        static_summary=summary,
        static_details=(
            f"Started by `mirrorflow replay` because run {latest.run_id} "
            f"ended {status}."
        ),
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )
    if handle.result_run_id is None:
        raise _UnreadableRun(f"Temporal started {latest.id} but named no run id")

    return handle.result_run_id


def _duration(value: Duration) -> timedelta | None:
    """Return a recorded timeout, or None where the run had none."""
    if not value.seconds and not value.nanos:
        return None

    return value.ToTimedelta()


def _status_name(status: WorkflowExecutionStatus | None) -> str:
    return _STATUS_NAMES.get(status, "Unknown") if status else "Unknown"


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)

    return moment.astimezone(UTC)


def _timestamp(moment: datetime) -> str:
    return _as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
