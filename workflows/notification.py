"""``NotificationWorkflow``: turn one Mirror notification into stored content.

The workflow only decides; activities do the work. It knows them by name and
by their data types, so it imports nothing from :mod:`activities`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.models import (
        OUTCOME,
        WORKFLOW_NAME,
        Attachment,
        AttachmentRef,
        ErrorType,
        Item,
        ItemRef,
        LocationRef,
        Notification,
        NotificationResult,
        Outcome,
        RemoveItemResult,
        StoreAttachmentInput,
        StoredObject,
        VerifyInput,
        VerifyResult,
    )

# Timeline actions after which the item may hold new content worth storing.
# PIN and UNPIN only move an item; unknown types are recorded and ignored.
CONTENT_ACTIONS = frozenset({"SHARE", "REPLY", "REPLY_ALL", "CUSTOM", "LAUNCH"})

_NOT_RETRYABLE = [
    ErrorType.GRANT_REVOKED,
    ErrorType.MIRROR_CLIENT_ERROR,
    ErrorType.MIRROR_GONE,
    ErrorType.PROCESSING_TIMED_OUT,
    ErrorType.STORAGE_REJECTED,
    ErrorType.UNKNOWN_SUBSCRIBER,
]

VERIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=_NOT_RETRYABLE,
)
MIRROR_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    non_retryable_error_types=_NOT_RETRYABLE,
)
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    non_retryable_error_types=_NOT_RETRYABLE,
)

# A Mirror call gives up after six hours of failed attempts: long enough to
# ride out an outage, short enough that a run does not sit "Running" forever.
MIRROR_GIVE_UP = timedelta(hours=6)
# A worker that dies mid-transfer is noticed after this long without a
# heartbeat, and another worker takes the transfer over.
STORE_HEARTBEAT = timedelta(seconds=30)
# Processing videos are polled by the activity itself (it sets the delay of
# each retry); the worker's MIRRORFLOW_PROCESSING_TIMEOUT ends the wait.
PROCESSING_GIVE_UP = timedelta(days=1)


@workflow.defn(name=WORKFLOW_NAME)
class NotificationWorkflow:
    """Verify a notification, fetch what it points at, and store its content."""

    @workflow.run
    async def run(self, notification: Notification) -> NotificationResult:
        """Process one notification and return how it ended."""
        verdict = await workflow.execute_activity(
            "verify",
            VerifyInput(
                user_token=notification.user_token,
                verify_token_sha256=notification.verify_token_sha256,
            ),
            result_type=VerifyResult,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=VERIFY_RETRY,
            summary="verify the sender",
        )
        if not verdict.accepted:
            workflow.logger.warning("Notification rejected: %s", verdict.reason)
            return self._end(Outcome.REJECTED, detail=verdict.reason)

        if notification.collection == "timeline":
            return await self._timeline(notification)
        if notification.collection == "locations":
            return await self._location(notification)

        return self._end(
            Outcome.IGNORED,
            detail=f"collection {notification.collection!r} is not processed",
        )

    async def _timeline(self, notification: Notification) -> NotificationResult:
        if notification.operation == "DELETE":
            return await self._remove(notification)

        actions = notification.action_types
        if actions and not CONTENT_ACTIONS.intersection(actions):
            return self._end(
                Outcome.IGNORED,
                detail=f"no action to process among {', '.join(actions)}",
            )

        item = await workflow.execute_activity(
            "fetch_item",
            ItemRef(user_token=notification.user_token, item_id=notification.item_id),
            result_type=Item,
            start_to_close_timeout=timedelta(minutes=2),
            schedule_to_close_timeout=MIRROR_GIVE_UP,
            retry_policy=MIRROR_RETRY,
            summary=f"fetch item {notification.item_id}",
        )
        if item.is_deleted:
            return self._end(Outcome.GONE, detail="the item was deleted")
        if not item.attachment_ids:
            return self._end(Outcome.IGNORED, detail="the item has no attachments")

        stored = await asyncio.gather(
            *(
                self._attachment(notification, attachment_id)
                for attachment_id in item.attachment_ids
            )
        )
        if any(entry is None for entry in stored):
            return self._end(
                Outcome.GONE, detail="the item was deleted while it was stored"
            )

        return self._end(
            Outcome.STORED,
            stored=tuple(entry for entry in stored if entry is not None),
        )

    async def _attachment(
        self, notification: Notification, attachment_id: str
    ) -> StoredObject | None:
        try:
            attachment = await self._fetch_attachment(notification, attachment_id)
        except ActivityError as error:
            if _error_type(error) == ErrorType.MIRROR_GONE:
                return None
            raise

        stored: StoredObject | None = await workflow.execute_activity(
            "store",
            StoreAttachmentInput(
                user_token=notification.user_token,
                item_id=notification.item_id,
                attachment=attachment,
            ),
            result_type=StoredObject | None,  # type: ignore[arg-type]
            start_to_close_timeout=timedelta(hours=1),
            heartbeat_timeout=STORE_HEARTBEAT,
            schedule_to_close_timeout=MIRROR_GIVE_UP,
            retry_policy=STORE_RETRY,
            summary=f"store attachment {attachment_id}",
        )

        return stored

    async def _fetch_attachment(
        self, notification: Notification, attachment_id: str
    ) -> Attachment:
        attachment: Attachment = await workflow.execute_activity(
            "fetch_attachment",
            AttachmentRef(
                user_token=notification.user_token,
                item_id=notification.item_id,
                attachment_id=attachment_id,
            ),
            result_type=Attachment,
            start_to_close_timeout=timedelta(minutes=2),
            schedule_to_close_timeout=PROCESSING_GIVE_UP,
            retry_policy=MIRROR_RETRY,
            summary=f"fetch attachment {attachment_id}",
        )

        return attachment

    async def _location(self, notification: Notification) -> NotificationResult:
        stored = await workflow.execute_activity(
            "store_location",
            LocationRef(
                user_token=notification.user_token,
                location_id=notification.item_id,
            ),
            result_type=StoredObject | None,  # type: ignore[arg-type]
            start_to_close_timeout=timedelta(minutes=2),
            schedule_to_close_timeout=MIRROR_GIVE_UP,
            retry_policy=MIRROR_RETRY,
            summary=f"store location {notification.item_id}",
        )
        if stored is None:
            return self._end(Outcome.GONE, detail="the location no longer exists")

        return self._end(Outcome.STORED, stored=(stored,))

    async def _remove(self, notification: Notification) -> NotificationResult:
        result = await workflow.execute_activity(
            "remove_item",
            ItemRef(user_token=notification.user_token, item_id=notification.item_id),
            result_type=RemoveItemResult,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=STORE_RETRY,
            summary=f"remove what was stored for item {notification.item_id}",
        )

        return self._end(Outcome.REMOVED, removed=result.removed)

    def _end(
        self,
        outcome: Outcome,
        *,
        stored: tuple[StoredObject, ...] = (),
        removed: tuple[str, ...] = (),
        detail: str = "",
    ) -> NotificationResult:
        workflow.upsert_search_attributes([OUTCOME.value_set(outcome.value)])

        return NotificationResult(
            outcome=outcome, stored=stored, removed=removed, detail=detail
        )


def _error_type(error: ActivityError) -> str | None:
    cause = error.cause

    return cause.type if isinstance(cause, ApplicationError) else None
