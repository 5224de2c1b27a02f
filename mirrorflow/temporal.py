"""Connect to Temporal the way every mirrorflow process does."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import timedelta

from temporalio.api.failure.v1 import Failure
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverter,
    PayloadConverter,
)
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)
from temporalio.service import RetryConfig, TLSConfig

from mirrorflow.errors import TemporalUnavailable
from mirrorflow.settings import Settings

FAILURE_BUDGET = 3072
"""Bytes a failure sent to Temporal may take, its causes included.

The server keeps a pending activity's last failure whole up to 4 KiB; past
that the UI shows "Failure exceeds size limit." in place of the message.
"""

_CUT = "  ... "
"""How a cut stack trace begins: this, the number of lines cut, " lines cut"."""


class TrimmedFailureConverter(DefaultFailureConverter):
    """Fit each failure within :data:`FAILURE_BUDGET` by cutting stack traces.

    Messages and types are kept whole. The longest stack trace loses its
    outermost half until the failure fits, so the frames nearest the error
    stay; the worker's log still has the whole traceback.
    """

    def to_failure(
        self,
        exception: BaseException,
        payload_converter: PayloadConverter,
        failure: Failure,
    ) -> None:
        """See :meth:`DefaultFailureConverter.to_failure`."""
        super().to_failure(exception, payload_converter, failure)
        trim_stack_traces(failure, FAILURE_BUDGET)


def trim_stack_traces(failure: Failure, budget: int) -> None:
    """Cut the stack traces of ``failure`` and its causes until it fits ``budget``."""
    chain = [failure]
    while chain[-1].HasField("cause"):
        chain.append(chain[-1].cause)
    while failure.ByteSize() > budget:
        longest = max(chain, key=lambda node: len(node.stack_trace))
        lines = longest.stack_trace.splitlines()
        cut = 0
        if lines and lines[0].startswith(_CUT) and lines[0].endswith(" lines cut"):
            cut = int(lines.pop(0).removeprefix(_CUT).split()[0])
        if len(lines) < 2:
            return
        kept = lines[len(lines) // 2 :]
        cut += len(lines) - len(kept)
        longest.stack_trace = "\n".join([f"{_CUT}{cut} lines cut", *kept])


DATA_CONVERTER: DataConverter = dataclasses.replace(
    pydantic_data_converter, failure_converter_class=TrimmedFailureConverter
)
"""The converter of every mirrorflow client: pydantic payloads, trimmed failures."""


def tls_config(settings: Settings) -> bool | TLSConfig:
    """Return how to reach Temporal: mTLS, plain TLS (Cloud API key) or none."""
    if settings.temporal_tls_cert and settings.temporal_tls_key:
        return TLSConfig(
            client_cert=settings.temporal_tls_cert.read_bytes(),
            client_private_key=settings.temporal_tls_key.read_bytes(),
        )

    return settings.temporal_tls or settings.temporal_api_key is not None


def process_runtime(*, metrics_port: int | None = None) -> Runtime:
    """Return the SDK runtime of a mirrorflow process.

    The SDK core's own log lines go through the standard library (and so
    through structlog's renderer) instead of straight to stderr; with a
    ``metrics_port`` the SDK's metrics are served for Prometheus.
    """
    logging_config = LoggingConfig(
        filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
        forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
    )
    metrics = None
    if metrics_port is not None:
        metrics = PrometheusConfig(bind_address=f"0.0.0.0:{metrics_port}")

    return Runtime(telemetry=TelemetryConfig(logging=logging_config, metrics=metrics))


async def connect(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    retry_config: RetryConfig | None = None,
    lazy: bool = False,
) -> Client:
    """Return a client for the configured Temporal, with mirrorflow's converter.

    ``retry_config`` bounds the client's own retries of failed RPCs; the
    webhook keeps them within its answer deadline. A ``lazy`` client returns
    at once and connects at its first call, so a process that can work
    without Temporal for a while (the webhook with its intake log) starts
    while Temporal is down.

    Raises:
        TemporalUnavailable: Temporal did not answer within
            ``MIRRORFLOW_TEMPORAL_CONNECT_TIMEOUT`` seconds.
    """
    api_key = settings.temporal_api_key
    timeout = settings.temporal_connect_timeout
    try:
        return await asyncio.wait_for(
            Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                api_key=api_key.get_secret_value() if api_key else None,
                tls=tls_config(settings),
                data_converter=DATA_CONVERTER,
                connect_timeout=timedelta(seconds=timeout),
                runtime=runtime,
                retry_config=retry_config,
                lazy=lazy,
            ),
            timeout=timeout,
        )
    except (TimeoutError, RuntimeError) as exc:
        raise TemporalUnavailable(
            f"Could not reach Temporal at {settings.temporal_address!r} "
            f"(namespace {settings.temporal_namespace!r}) within {timeout:g} s: "
            f"{exc or type(exc).__name__}. Start it (`mirrorflow dev` runs one) "
            "or set MIRRORFLOW_TEMPORAL_ADDRESS."
        ) from exc
