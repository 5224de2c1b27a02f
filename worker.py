"""Run a Temporal worker for ``NotificationWorkflow`` and its activities.

``mirrorflow worker`` calls :func:`main`; tests build a worker with
:func:`create_worker` against their own client and task queue.
"""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities.notification import NotificationActivities
from activities.storage import open_storage
from activities.subscribers import SubscriberStore
from mirrorflow.settings import Settings
from mirrorflow.temporal import connect, process_runtime
from workflows import NotificationWorkflow

log = structlog.get_logger("mirrorflow.worker")


def create_activities(settings: Settings) -> NotificationActivities:
    """Return the activities bound to the configured subscribers and storage."""
    return NotificationActivities(
        subscribers=SubscriberStore(settings.database_path),
        storage=open_storage(settings.storage_url),
        mirror_root_url=settings.mirror_root_url,
        mirror_timeout=settings.mirror_timeout,
        processing_timeout=settings.processing_timeout,
    )


def create_worker(
    client: Client,
    settings: Settings,
    activities: NotificationActivities,
    *,
    task_queue: str | None = None,
) -> Worker:
    """Return a worker for the workflow and activities, sized by settings.

    The activities block on Google's clients, so they run on a thread pool as
    wide as the activity concurrency; the event loop stays free for polling
    and heartbeats.
    """
    return Worker(
        client,
        task_queue=task_queue or settings.temporal_task_queue,
        workflows=[NotificationWorkflow],
        activities=activities.definitions(),
        activity_executor=ThreadPoolExecutor(
            max_workers=settings.max_concurrent_activities,
            thread_name_prefix="activity",
        ),
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        max_activities_per_second=settings.mirror_calls_per_second,
        # An activity handed over eagerly, with the workflow task that
        # scheduled it, skips the poller that the rate above limits.
        disable_eager_activity_execution=settings.mirror_calls_per_second is not None,
        graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown),
    )


async def run_worker(settings: Settings) -> None:
    """Run a worker until SIGINT or SIGTERM, then drain it gracefully."""
    runtime = process_runtime(metrics_port=settings.worker_metrics_port)
    client = await connect(settings, runtime=runtime)
    worker = create_worker(client, settings, create_activities(settings))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    log.info(
        "worker_started",
        task_queue=settings.temporal_task_queue,
        temporal_address=settings.temporal_address,
        namespace=settings.temporal_namespace,
        storage_url=settings.storage_url,
        metrics_port=settings.worker_metrics_port,
    )
    async with worker:
        await stop.wait()
        log.info("worker_stopping", graceful_seconds=settings.graceful_shutdown)
    log.info("worker_stopped")
