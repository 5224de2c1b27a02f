"""The Starlette app that receives Mirror's notifications and starts workflows.

``POST /notify`` answers 200 only once the notification is durable: with
``MIRRORFLOW_INTAKE=direct`` once Temporal has accepted the workflow start,
with ``MIRRORFLOW_INTAKE=log`` once it is committed to the local intake log
(:mod:`webhook.intake`), from which a forwarder starts the workflow. Every
other answer lets Mirror resend. The routes:

- ``POST <webhook_path>``: validate the notification, check its sender,
  start (or join) its ``NotificationWorkflow`` or log it, answer.
- ``GET /healthz``: the process is alive.
- ``GET /readyz``: Temporal answers a health check (direct), or the intake
  log takes notifications (log).
- ``GET /metrics``: Prometheus text.

docs/webhook.md and docs/intake.md explain the status codes and the
decisions behind them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import Runtime
from temporalio.service import RetryConfig, RPCError
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from activities.subscribers import SubscriberStore
from mirrorflow.errors import TemporalUnavailable
from mirrorflow.logs import configure_logging
from mirrorflow.settings import Settings, load_settings
from mirrorflow.temporal import connect, process_runtime
from webhook.deadlines import Deadlines
from webhook.intake import Forwarder, IntakeError, IntakeLog
from webhook.metrics import WebhookMetrics
from webhook.notifications import MAX_BODY_BYTES, NotificationError, parse_notification
from webhook.protocol import HEAD_TIMEOUT, head_deadline_protocol
from webhook.senders import SenderCheck, Verdict
from workflows.models import (
    WORKFLOW_NAME,
    Notification,
    canonical_json,
    search_attributes_for,
    workflow_id_for,
)

READINESS_TIMEOUT = 1.0
"""Seconds ``/readyz`` waits for Temporal's health check."""

BUSY_REQUESTS = 8
"""Notifications being answered at once past which the webhook counts as busy.

With the intake log, a busy webhook has its forwarder start workflows one at
a time (:class:`~webhook.intake.Forwarder`), leaving the CPU to the answers.
"""

BODY_TIMEOUT = 10.0
"""Seconds a sender has to deliver the whole body: Mirror's own timeout.

Mirror sends a few hundred bytes at once; a body still trickling in after
this long comes from something else, and holding a connection for it
would let slow senders pile up."""

log: structlog.stdlib.BoundLogger = structlog.get_logger("webhook")

_Headers = Sequence[tuple[bytes, bytes]]
"""Extra response headers, as ASGI sends them."""

_ALLOW_POST: _Headers = ((b"allow", b"POST"),)


class _Refusal(Exception):
    """A notification request the webhook answers with an error status.

    ``message`` goes to the sender; ``detail``, which may name internals such
    as Temporal's own error, goes to the log only.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        headers: _Headers = (),
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers
        self.detail = detail


class Webhook:
    """What one app holds: settings, the Temporal client, sender check, metrics."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: Client | None,
        subscribers: SubscriberStore | None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = WebhookMetrics()
        self.sender_check: SenderCheck | None = None
        if settings.check_sender:
            store = subscribers or SubscriberStore(settings.database_path)
            self.sender_check = SenderCheck(store)

        self.intake: IntakeLog | None = None
        self.forwarder: Forwarder | None = None
        if settings.intake == "log":
            self.intake = IntakeLog(
                settings.intake_path,
                max_rows=settings.intake_max_backlog,
                max_bytes=settings.intake_max_bytes,
                metrics=self.metrics,
            )

        self._starts_in_flight = 0
        self._requests_in_flight = 0
        self._deadlines = Deadlines()
        self.metrics.starts_in_flight.set_function(lambda: self._starts_in_flight)
        # A second past the start deadline, so that the request's own
        # deadline (kept to within a tick) decides its answer; this bounds
        # the forwarder's starts, which have no other deadline.
        self._rpc_timeout = timedelta(seconds=settings.start_deadline + 1)
        self._retry_after = ((b"retry-after", str(settings.retry_after).encode()),)

    def __repr__(self) -> str:
        return (
            f"Webhook(path={self.settings.webhook_path!r}, "
            f"task_queue={self.settings.temporal_task_queue!r}, "
            f"check_sender={self.settings.check_sender}, "
            f"intake={self.settings.intake!r})"
        )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Connect to Temporal once for the whole process, unless given a client.

        With the intake log on, open it and forward what it holds until the
        app stops; then commit what is pending and close it.

        Raises:
            TemporalUnavailable: Temporal could not be reached in time (direct
                path only); the server does not start.
            IntakeError: the intake log is held by another process.
        """
        if self.client is None:
            self.client = await _connect(self.settings)
        if self.intake is not None:
            await self.intake.open()
            self.forwarder = Forwarder(
                self.intake,
                self._start_workflow,
                concurrency=self.settings.intake_forward_concurrency,
                rate=self.settings.intake_forward_rate,
                metrics=self.metrics,
                busy=lambda: self._requests_in_flight >= BUSY_REQUESTS,
            )
            self.forwarder.start()

        log.info(
            "webhook_started",
            path=self.settings.webhook_path,
            temporal_address=self.client.service_client.config.target_host,
            namespace=self.client.namespace,
            task_queue=self.settings.temporal_task_queue,
            check_sender=self.settings.check_sender,
            intake=self.settings.intake,
        )
        try:
            yield
        finally:
            if self.forwarder is not None:
                await self.forwarder.stop()
                self.forwarder = None
            if self.intake is not None:
                await self.intake.close()

    async def notify(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request to the webhook path, as a plain ASGI app.

        Only ``POST`` is served: validate, check the sender, start or log,
        then answer (see :class:`WebhookApp` for why this skips Starlette's
        request and response objects).
        """
        if scope["method"] != "POST":
            await _send(
                send,
                405,
                _error(f"Send notifications with POST, not {scope['method']}."),
                _ALLOW_POST,
            )
            return

        began = time.perf_counter()
        self._requests_in_flight += 1
        try:
            status, body, headers = await self._notify(scope, receive, began)
        finally:
            self._requests_in_flight -= 1
        await _send(send, status, body, headers)

    async def _notify(
        self, scope: Scope, receive: Receive, began: float
    ) -> tuple[int, bytes, _Headers]:
        """Return the status, JSON body and headers of a notification's answer."""
        context: dict[str, Any] = {}
        deadlines = self._deadlines
        # First the body's deadline, then, once the body is in, the deadline
        # for making the notification durable.
        deadlines.set(BODY_TIMEOUT)
        reading = True
        try:
            notification = parse_notification(await _read_body(scope, receive))
            reading = False
            deadlines.set(self.settings.start_deadline)
            context.update(
                user_token=notification.user_token,
                collection=notification.collection,
                operation=notification.operation,
                item_id=notification.item_id,
            )
            canonical = canonical_json(notification)
            workflow_id = workflow_id_for(notification, canonical)
            context["workflow_id"] = workflow_id
            if self.intake is None:
                is_new = await self._accept(notification, workflow_id)
            else:
                await self._log(notification, workflow_id, canonical, self.intake)
        except NotificationError as exc:
            refusal = _Refusal(400, exc.reason, str(exc))
        except _Refusal as exc:
            refusal = exc
        except asyncio.CancelledError:
            if not deadlines.expired():
                raise
            refusal = _body_timeout() if reading else self._deadline_exceeded()
        else:
            seconds = time.perf_counter() - began
            self.metrics.record_answer(200, seconds)
            write = log.info
            if self.intake is not None:
                # The INFO line comes when the forwarder starts the workflow
                # (``notification_forwarded``): a line per 200 here would cost
                # a burst a quarter of the webhook's CPU (docs/intake.md).
                write = log.debug
                context["outcome"] = "logged"
            elif is_new:
                context["outcome"] = "started"
                self.metrics.workflows_started.inc()
            else:
                context["outcome"] = "duplicate"
                self.metrics.duplicates.inc()
            write(
                "notification_received",
                status=200,
                duration_ms=round(seconds * 1000, 1),
                **context,
            )
            return 200, _accepted(workflow_id), ()
        finally:
            deadlines.clear()

        seconds = time.perf_counter() - began
        self.metrics.record_answer(refusal.status, seconds)
        self.metrics.record_rejection(refusal.reason)
        context["outcome"] = refusal.reason
        context["error"] = refusal.message
        if refusal.detail is not None:
            context["detail"] = refusal.detail
        _log_for(refusal.status)(
            "notification_received",
            status=refusal.status,
            duration_ms=round(seconds * 1000, 1),
            **context,
        )

        return refusal.status, _error(refusal.message), refusal.headers

    def _deadline_exceeded(self) -> _Refusal:
        deadline = self.settings.start_deadline
        what = "handed to Temporal" if self.intake is None else "written to disk"
        return _Refusal(
            503,
            "deadline_exceeded",
            f"The notification could not be {what} within {deadline:g} s; "
            "try again later.",
            headers=self._retry_after,
        )

    async def _accept(self, notification: Notification, workflow_id: str) -> bool:
        """Check the sender and start the workflow.

        Returns whether Temporal started a new run (False for a duplicate).
        The caller bounds the wait by the start deadline.
        """
        # Past the bound, more waiting requests only slow every answer down:
        # refuse at once, and the starts in flight still finish in time.
        limit = self.settings.max_starts_in_flight
        if self._starts_in_flight >= limit:
            raise _Refusal(
                503,
                "overloaded",
                f"The webhook already has {limit} notifications waiting for "
                "Temporal; try again later.",
                headers=self._retry_after,
            )

        self._starts_in_flight += 1
        try:
            await self._check_sender(notification)
            return await self._start(notification, workflow_id)
        finally:
            self._starts_in_flight -= 1

    async def _log(
        self,
        notification: Notification,
        workflow_id: str,
        canonical: str,
        intake: IntakeLog,
    ) -> None:
        """Check the sender and commit the notification to the intake log.

        The caller bounds the wait by the start deadline.
        """
        await self._check_sender(notification)
        try:
            await intake.append(workflow_id, canonical)
        except IntakeError as exc:
            raise _Refusal(
                503, exc.reason, str(exc), headers=self._retry_after
            ) from exc

    async def _check_sender(self, notification: Notification) -> None:
        if self.sender_check is None:
            return

        try:
            verdict = await self.sender_check.check(
                notification.user_token, notification.verify_token_sha256
            )
        except sqlite3.Error as exc:
            raise _Refusal(
                503,
                "subscribers_unavailable",
                "The subscribers database could not be read; try again later.",
                headers=self._retry_after,
                detail=f"{type(exc).__name__}: {exc}",
            ) from exc
        if verdict is not Verdict.ACCEPTED:
            # One message for both causes, so that a forger cannot learn which
            # user tokens exist; the reason is in the metrics and the log.
            raise _Refusal(
                403,
                verdict.value,
                f"userToken {notification.user_token!r} is not a subscriber, or "
                "verifyToken does not match its subscription.",
            )

    async def _start(self, notification: Notification, workflow_id: str) -> bool:
        if self.client is None:
            raise _Refusal(
                503,
                "temporal_unavailable",
                "The webhook is not connected to Temporal yet; try again later.",
                headers=self._retry_after,
            )

        try:
            return await self._start_workflow(notification, workflow_id)
        except RPCError as exc:
            raise _Refusal(
                503,
                "temporal_unavailable",
                "Temporal did not accept the workflow start; try again later.",
                headers=self._retry_after,
                detail=f"{exc.status.name}: {exc.message}",
            ) from exc

    async def _start_workflow(
        self, notification: Notification, workflow_id: str
    ) -> bool:
        """Start or join a notification's workflow; return whether a run began.

        Raises:
            RPCError: Temporal did not accept the start.
        """
        assert self.client is not None, "connected in the lifespan"
        try:
            handle = await self.client.start_workflow(
                WORKFLOW_NAME,
                notification,
                id=workflow_id,
                task_queue=self.settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                search_attributes=search_attributes_for(notification),
                static_summary=summarize(notification),
                rpc_timeout=self._rpc_timeout,
            )
        except WorkflowAlreadyStartedError:
            # A completed run of this id exists: the notification was handled.
            return False

        return _is_new_run(handle)

    async def healthz(self, request: Request) -> Response:
        """Answer 200 while the process runs."""
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        """Answer 200 when the webhook can give a 200, else 503.

        Direct: when Temporal answers a health check. Log: when the intake
        log is open and below its limit, whatever Temporal's state, which
        the body reports beside the backlog.
        """
        temporal_problem = await self._temporal_problem()
        if self.intake is None:
            if temporal_problem is not None:
                return _not_ready(temporal_problem)
            return JSONResponse({"status": "ready"})

        body: dict[str, Any] = {"status": "ready"}
        if self.intake.is_open:
            backlog = await self.intake.backlog()
            body["intake"] = {
                "backlog": backlog.rows,
                "backlog_bytes": backlog.bytes,
                "oldest_age_seconds": round(backlog.oldest_age, 3),
            }
        body["temporal"] = temporal_problem or "serving"
        if not self.intake.is_open:
            body.update(status="unavailable", error="the intake log is not open")
        elif self.intake.is_full:
            body.update(status="unavailable", error="the intake log is full")

        return JSONResponse(body, 200 if body["status"] == "ready" else 503)

    async def _temporal_problem(self) -> str | None:
        """Return why Temporal does not answer a health check, or None."""
        if self.client is None:
            return "not connected to Temporal yet"

        try:
            async with asyncio.timeout(READINESS_TIMEOUT):
                serving = await self.client.service_client.check_health(
                    timeout=timedelta(seconds=READINESS_TIMEOUT)
                )
        except TimeoutError:
            return f"no answer from Temporal within {READINESS_TIMEOUT:g} s"
        except RPCError as exc:
            return f"{exc.status.name}: {exc.message}"
        except RuntimeError as exc:
            # A lazy client that has not connected yet fails this way.
            return f"cannot connect to Temporal: {exc}"
        if not serving:
            return "Temporal's workflow service is not serving"

        return None

    async def metrics_text(self, request: Request) -> Response:
        """Answer with the metrics in Prometheus' text format."""
        if self.intake is not None and self.intake.is_open:
            backlog = await self.intake.backlog()
            self.metrics.intake_backlog.set(backlog.rows)
            self.metrics.intake_backlog_bytes.set(backlog.bytes)
            self.metrics.intake_oldest_age.set(backlog.oldest_age)

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(
    settings: Settings | None = None,
    *,
    client: Client | None = None,
    subscribers: SubscriberStore | None = None,
) -> Starlette:
    """Return the webhook app.

    Args:
        settings: the settings; read from the environment when None.
        client: a connected Temporal client; when None the app connects once
            at startup (its lifespan) with :func:`mirrorflow.temporal.connect`.
        subscribers: the store the sender check reads; when None and
            ``check_sender`` is on, the one at ``settings.database_path``.
    """
    settings = settings or load_settings()

    return WebhookApp(Webhook(settings, client=client, subscribers=subscribers))


class WebhookApp(Starlette):
    """The webhook's Starlette app, which hands its webhook path to ASGI directly.

    Every notification comes to one path, and Starlette's router, request and
    response objects cost about as much CPU per request as the webhook's own
    work (``python -m bench.intake`` measures the difference). So requests to
    the webhook path go straight to :meth:`Webhook.notify`; the probes, the
    metrics and the lifespan are Starlette's. ``app.state.webhook`` is the
    :class:`Webhook`.
    """

    def __init__(self, webhook: Webhook) -> None:
        super().__init__(
            routes=[
                Route("/healthz", webhook.healthz, methods=["GET"]),
                Route("/readyz", webhook.readyz, methods=["GET"]),
                Route("/metrics", webhook.metrics_text, methods=["GET"]),
            ],
            lifespan=webhook.lifespan,
        )
        self.state.webhook = webhook
        self._notify = webhook.notify
        self._notify_path = webhook.settings.webhook_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the webhook path directly and pass everything else on."""
        if scope["type"] == "http" and scope["path"] == self._notify_path:
            await self._notify(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


async def _connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """Return the webhook's Temporal client.

    The intake log takes notifications while Temporal is down, so a webhook
    with one connects lazily, at its first call, rather than waiting.
    """
    return await connect(
        settings,
        runtime=runtime,
        retry_config=_retries(settings),
        lazy=settings.intake == "log",
    )


async def run(settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the webhook on ``host:port`` until the process is told to stop.

    On the direct path Temporal is connected to before the server starts
    listening, so that an unreachable Temporal stops the process with one
    clear error; with the intake log the server starts regardless. Logging
    is left as it is; :func:`serve` configures it first.

    Raises:
        TemporalUnavailable: Temporal could not be reached at startup.
    """
    try:
        client = await _connect(settings, runtime=process_runtime())
    except TemporalUnavailable as exc:
        log.error("webhook_startup_failed", error=str(exc))
        raise

    app = create_app(settings, client=client)
    # What is loaded by now lives as long as the process. Left to the
    # collector, every full collection walks all of it (the Temporal client,
    # protobuf, pydantic) in the middle of some request: those pauses were
    # the webhook's p99.
    gc.freeze()
    await uvicorn.Server(server_config(app, host, port)).serve()


def server_config(
    app: Starlette,
    host: str,
    port: int,
    *,
    head_timeout: float = HEAD_TIMEOUT,
    http: type[asyncio.Protocol] = AutoHTTPProtocol,
) -> uvicorn.Config:
    """Return how uvicorn serves the webhook app on ``host:port``.

    A connection whose request line and headers take longer than
    ``head_timeout`` seconds is answered 408 and closed. ``http`` is
    uvicorn's HTTP protocol to serve with: by default httptools when it is
    installed, else h11.
    """
    webhook: Webhook = app.state.webhook

    def head_timed_out() -> None:
        webhook.metrics.head_timeouts.inc()
        log.info("connection_closed", reason="head_timeout", timeout=head_timeout)

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=head_deadline_protocol(head_timeout, head_timed_out, base=http),
        ws="none",
        lifespan="on",
        # The app logs one line per notification itself.
        access_log=False,
        log_config=None,
        server_header=False,
        # Let requests in flight finish their start before the process ends.
        timeout_graceful_shutdown=math.ceil(webhook.settings.start_deadline) + 1,
    )


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Configure logging and serve the webhook, on uvloop when it is installed.

    Raises:
        TemporalUnavailable: Temporal could not be reached at startup.
    """
    configure_logging(settings.log_level, settings.log_format)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run(settings, host, port))


def summarize(notification: Notification) -> str:
    """Return the one-line summary shown for a notification's workflow."""
    summary = (
        f"{notification.collection} {notification.operation} item "
        f"{notification.item_id} of user {notification.user_token}"
    )
    if notification.user_actions:
        summary += f" [{', '.join(notification.action_types)}]"

    return summary


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    """Return the body of a JSON request, refusing more than the limit."""
    content_type: str | None = None
    declared = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            declared = value
    if not _is_json(content_type):
        raise _Refusal(
            415,
            "unsupported_media_type",
            "The request has no Content-Type; send application/json."
            if content_type is None
            else f"Content-Type {content_type!r} is not accepted; "
            "send application/json.",
        )

    # A value too long to be a size is refused before int() has to read it.
    if declared.isdigit() and (len(declared) > 9 or int(declared) > MAX_BODY_BYTES):
        raise _too_large()

    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refusal(400, "client_disconnected", "The client went away mid-body.")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _accepted(workflow_id: str) -> bytes:
    # Every 200 has this body; only the id is encoded on each request.
    return (
        b'{"status": "accepted", "workflow_id": %s}' % json.dumps(workflow_id).encode()
    )


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def _send(send: Send, status: int, content: bytes, headers: _Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


def _body_timeout() -> _Refusal:
    return _Refusal(
        408,
        "body_timeout",
        f"The body did not arrive within {BODY_TIMEOUT:g} seconds.",
    )


def _too_large() -> _Refusal:
    return _Refusal(
        413,
        "too_large",
        f"The body is larger than {MAX_BODY_BYTES} bytes; "
        "a Mirror notification is far smaller.",
    )


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media_type = content_type.partition(";")[0].strip().lower()

    return media_type == "application/json"


def _is_new_run(handle: WorkflowHandle[Any, Any]) -> bool:
    """Return whether a start made a new run rather than joining a running one."""
    # The SDK keeps the server's answer on the handle but does not expose its
    # `started` flag; reading it costs nothing, unlike a describe call. If a
    # later SDK drops the attribute, every start counts as new.
    response = getattr(handle, "_start_workflow_response", None)

    return bool(getattr(response, "started", True))


def _log_for(status: int) -> Callable[..., Any]:
    if status < 400:
        return log.info
    if status < 500:
        return log.warning

    return log.error


def _not_ready(why: str) -> Response:
    return JSONResponse({"status": "unavailable", "error": why}, 503)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None

    return uvloop.new_event_loop


def _retries(settings: Settings) -> RetryConfig:
    """Keep the client's own RPC retries within the answer deadline."""
    return RetryConfig(max_elapsed_time_millis=int(settings.start_deadline * 1000))
