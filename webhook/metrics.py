"""Count what the webhook answers, in a Prometheus registry of its own.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` rather
than the process-wide default, so that a process (or a test session) can
build many apps without their metrics colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

STATUSES = ("200", "400", "403", "413", "415", "503")
"""The statuses ``POST /notify`` answers with, shown at 0 before the first."""

REASONS = (
    "too_large",
    "unsupported_media_type",
    "invalid_json",
    "invalid_notification",
    "unknown_sender",
    "wrong_verify_token",
    "subscribers_unavailable",
    "temporal_unavailable",
    "deadline_exceeded",
    "client_disconnected",
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
