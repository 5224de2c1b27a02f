"""The baseline of the end-to-end benchmark: four activities that do nothing.

``NoopWorkflow`` calls four synchronous activities in the order and with the
data types of ``NotificationWorkflow`` for a shared photo (verify,
fetch_item, fetch_attachment, store), and each answers at once. What the real
pipeline costs beyond it is Mirror, storage and mirrorflow's own activity
code; what both cost is Temporal's scheduling and the SDK.

    python -m bench.noop worker    # a worker for it, configured by MIRRORFLOW_*
"""

from __future__ import annotations

import sys
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        Attachment,
        AttachmentRef,
        Item,
        ItemRef,
        Notification,
        StoreAttachmentInput,
        StoredObject,
        VerifyInput,
        VerifyResult,
    )

NOOP_WORKFLOW = "BenchNoopWorkflow"
_TIMEOUT = timedelta(seconds=30)


@activity.defn(name="noop_verify")
def verify(request: VerifyInput) -> VerifyResult:
    """Accept every sender."""
    return VerifyResult(accepted=True)


@activity.defn(name="noop_fetch_item")
def fetch_item(ref: ItemRef) -> Item:
    """Return an item with one attachment."""
    return Item(item_id=ref.item_id, attachment_ids=("a1",))


@activity.defn(name="noop_fetch_attachment")
def fetch_attachment(ref: AttachmentRef) -> Attachment:
    """Return the attachment's metadata."""
    return Attachment(
        attachment_id=ref.attachment_id,
        content_type="image/jpeg",
        content_url="http://127.0.0.1/none",
    )


@activity.defn(name="noop_store")
def store(request: StoreAttachmentInput) -> StoredObject:
    """Pretend to have stored the attachment."""
    return StoredObject(
        name=f"{request.item_id}/{request.attachment.attachment_id}.jpg",
        size=0,
        sha256="0" * 64,
        content_type=request.attachment.content_type,
    )


@workflow.defn(name=NOOP_WORKFLOW)
class NoopWorkflow:
    """Call the four activities one after another, as the pipeline does."""

    @workflow.run
    async def run(self, notification: Notification) -> StoredObject:
        """Run the four activities and return the last one's result."""
        await workflow.execute_activity(
            verify,
            VerifyInput(
                user_token=notification.user_token,
                verify_token_sha256=notification.verify_token_sha256,
            ),
            start_to_close_timeout=_TIMEOUT,
        )
        ref = ItemRef(user_token=notification.user_token, item_id=notification.item_id)
        item = await workflow.execute_activity(
            fetch_item, ref, start_to_close_timeout=_TIMEOUT
        )
        attachment = await workflow.execute_activity(
            fetch_attachment,
            AttachmentRef(
                user_token=notification.user_token,
                item_id=notification.item_id,
                attachment_id=item.attachment_ids[0],
            ),
            start_to_close_timeout=_TIMEOUT,
        )

        return await workflow.execute_activity(
            store,
            StoreAttachmentInput(
                user_token=notification.user_token,
                item_id=notification.item_id,
                attachment=attachment,
            ),
            start_to_close_timeout=_TIMEOUT,
        )


async def run_worker() -> None:
    """Run a worker for ``NoopWorkflow`` until SIGTERM, sized like mirrorflow's."""
    import asyncio
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from temporalio.worker import Worker

    from mirrorflow.logs import configure_logging
    from mirrorflow.settings import load_settings
    from mirrorflow.temporal import connect

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    client = await connect(settings)
    # The same sizing as worker.create_worker gives mirrorflow's worker.
    worker = Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[NoopWorkflow],
        activities=[verify, fetch_item, fetch_attachment, store],
        activity_executor=ThreadPoolExecutor(
            max_workers=settings.max_concurrent_activities,
            thread_name_prefix="activity",
        ),
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        max_activities_per_second=settings.mirror_calls_per_second,
        graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with worker:
        print("noop_worker_started", flush=True)
        await stop.wait()


if __name__ == "__main__":
    if sys.argv[1:] != ["worker"]:
        sys.exit("usage: python -m bench.noop worker")
    import asyncio

    asyncio.run(run_worker())
