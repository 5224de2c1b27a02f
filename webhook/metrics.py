"""Count what the webhook answers, in a Prometheus registry of its own.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` rather
than the process-wide default, so that a process (or a test session) can
build many apps without their metrics colliding.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STATUSES = ("200", "400", "403", "408", "413", "415", "503")
"""The statuses ``POST /notify`` answers with, shown at 0 before the first."""

REASONS = (
    "too_large",
    "unsupported_media_type",
    "invalid_json",
    "invalid_notification",
    "body_timeout",
    "unknown_sender",
    "wrong_verify_token",
    "subscribers_unavailable",
    "temporal_unavailable",
    "deadline_exceeded",
    "overloaded",
    "client_disconnected",
    "intake_full",
    "intake_unavailable",
)
"""Why a notification was not accepted, one label value per cause."""

# Mirror gives up after 10 s; the interesting part is well below that.
_ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WebhookMetrics:
    """The webhook's counters and its acknowledgement latency histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "mirrorflow_webhook_requests",
            "Notification requests answered, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "mirrorflow_webhook_ack_seconds",
            "Time from receiving a notification request to answering it.",
            buckets=_ACK_BUCKETS,
            registry=self.registry,
        )
        self.workflows_started = Counter(
            "mirrorflow_webhook_workflows_started",
            "Notification workflows Temporal started at the webhook's request.",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "mirrorflow_webhook_duplicates",
            "Notifications folded into a running or completed workflow.",
            registry=self.registry,
        )
        self.rejections = Counter(
            "mirrorflow_webhook_rejections",
            "Notification requests not accepted, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.head_timeouts = Counter(
            "mirrorflow_webhook_head_timeouts",
            "Connections closed because a request's head came too slowly.",
            registry=self.registry,
        )

        self.intake_appended = Counter(
            "mirrorflow_intake_appended",
            "Notifications committed to the intake log (each one answered 200).",
            registry=self.registry,
        )
        self.intake_commits = Counter(
            "mirrorflow_intake_commits",
            "Transactions committed to the intake log; appended / commits is "
            "the average group commit.",
            registry=self.registry,
        )
        self.intake_forwarded = Counter(
            "mirrorflow_intake_forwarded",
            "Logged notifications whose workflow start Temporal accepted.",
            registry=self.registry,
        )
        self.intake_forward_failures = Counter(
            "mirrorflow_intake_forward_failures",
            "Workflow starts from the intake log that Temporal did not accept.",
            registry=self.registry,
        )
        self.starts_in_flight = Gauge(
            "mirrorflow_webhook_starts_in_flight",
            "Notifications waiting for Temporal to accept their start (direct).",
            registry=self.registry,
        )
        self.intake_backlog = Gauge(
            "mirrorflow_intake_backlog",
            "Notifications in the intake log that Temporal has not accepted yet.",
            registry=self.registry,
        )
        self.intake_backlog_bytes = Gauge(
            "mirrorflow_intake_backlog_bytes",
            "Bytes of notifications in the intake log not accepted by Temporal.",
            registry=self.registry,
        )
        self.intake_oldest_age = Gauge(
            "mirrorflow_intake_oldest_age_seconds",
            "Age of the oldest notification in the intake log (0 when empty).",
            registry=self.registry,
        )

        self._by_status = {status: self.requests.labels(status) for status in STATUSES}
        self._by_reason = {reason: self.rejections.labels(reason) for reason in REASONS}

    def record_answer(self, status: int, seconds: float) -> None:
        """Count one answer to ``POST /notify`` and how long it took."""
        key = str(status)
        counter = self._by_status.get(key)
        if counter is None:
            counter = self._by_status[key] = self.requests.labels(key)
        counter.inc()
        self.ack_seconds.observe(seconds)

    def record_rejection(self, reason: str) -> None:
        """Count one notification that was not accepted."""
        counter = self._by_reason.get(reason)
        if counter is None:
            counter = self._by_reason[reason] = self.rejections.labels(reason)
        counter.inc()

    def render(self) -> bytes:
        """Return the metrics in Prometheus' text format."""
        return generate_latest(self.registry)
