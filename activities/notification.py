"""The activities of ``NotificationWorkflow``: verify, fetch, store, remove.

Each activity is a plain synchronous method run on the worker's thread pool,
because the Google clients it calls block. Failures leave as
``ApplicationError``s with the stable types of
:class:`workflows.models.ErrorType`; those that no retry can fix are marked
non-retryable. Nothing an activity returns holds a token or content bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from google.oauth2.credentials import Credentials
from temporalio import activity
from temporalio.exceptions import ApplicationError, FailureError

from activities import mirror
from activities.mirror import Failure
from activities.storage import (
    Storage,
    item_prefix,
    location_object_name,
    object_name,
    tombstone_name,
)
from activities.subscribers import SubscriberStore
from mirrorflow.errors import ChecksumMismatch, StorageError, StorageRejected
from workflows.models import (
    Attachment,
    AttachmentRef,
    ErrorType,
    Item,
    ItemRef,
    LocationRef,
    RemoveItemResult,
    StoreAttachmentInput,
    StoredObject,
    VerifyInput,
    VerifyResult,
)

HEARTBEAT_EVERY = 5.0
"""Seconds between heartbeats of a long transfer."""


class NotificationActivities:
    """The activities, bound to one worker's subscribers, storage and settings."""

    def __init__(
        self,
        *,
        subscribers: SubscriberStore,
        storage: Storage,
        mirror_root_url: str,
        mirror_timeout: float = 30.0,
        processing_timeout: float = 1800.0,
    ) -> None:
        self.subscribers = subscribers
        self.storage = storage
        self.mirror_root_url = mirror_root_url
        self.mirror_timeout = mirror_timeout
        self.processing_timeout = processing_timeout

    def definitions(self) -> list[Any]:
        """Return the activity callables to register on a worker."""
        return [
            self.verify,
            self.fetch_item,
            self.fetch_attachment,
            self.store,
            self.store_location,
            self.remove_item,
        ]

    @activity.defn(name="verify")
    def verify(self, request: VerifyInput) -> VerifyResult:
        """Accept the notification only from a known subscriber's verify token."""
        subscriber = self.subscribers.find(request.user_token)
        if subscriber is None:
            return VerifyResult(accepted=False, reason="unknown user token")
        if not subscriber.accepts(request.verify_token_sha256):
            return VerifyResult(accepted=False, reason="verify token does not match")

        return VerifyResult(accepted=True)

    @activity.defn(name="fetch_item")
    def fetch_item(self, ref: ItemRef) -> Item:
        """Fetch a timeline item as its user; a missing item counts as deleted."""
        with self._as_user(ref.user_token) as credentials:
            try:
                request = self._mirror("timeline").get(id=ref.item_id)
                item = self._execute(credentials, request)
            except mirror.HttpError as exc:
                if mirror.classify(exc) is Failure.GONE:
                    return Item(item_id=ref.item_id, is_deleted=True)
                raise

        return Item(
            item_id=ref.item_id,
            is_deleted=bool(item.get("isDeleted", False)),
            attachment_ids=tuple(a["id"] for a in item.get("attachments", [])),
        )

    @activity.defn(name="fetch_attachment")
    def fetch_attachment(self, ref: AttachmentRef) -> Attachment:
        """Fetch an attachment's metadata once its content is ready."""
        with self._as_user(ref.user_token) as credentials:
            request = self._mirror("timeline", "attachments").get(
                itemId=ref.item_id, attachmentId=ref.attachment_id
            )
            found = self._execute(credentials, request)

        if found.get("isProcessingContent") or not found.get("contentUrl"):
            raise self._still_processing(ref)

        return Attachment(
            attachment_id=ref.attachment_id,
            content_type=found.get("contentType") or "application/octet-stream",
            content_url=found["contentUrl"],
        )

    def _still_processing(self, ref: AttachmentRef) -> ApplicationError:
        info = activity.info()
        waited = (datetime.now(UTC) - info.scheduled_time).total_seconds()
        if waited >= self.processing_timeout:
            return ApplicationError(
                f"Attachment {ref.attachment_id!r} of item {ref.item_id!r} was "
                f"still processing after {waited:.0f} s (limit "
                f"MIRRORFLOW_PROCESSING_TIMEOUT={self.processing_timeout:g} s); "
                "replay the run once Mirror has finished processing it.",
                type=ErrorType.PROCESSING_TIMED_OUT,
                non_retryable=True,
            )

        # Poll less and less often: 2 s, 3 s, 4.5 s ... up to one minute.
        delay = min(2.0 * 1.5 ** (info.attempt - 1), 60.0)
        return ApplicationError(
            f"Attachment {ref.attachment_id!r} is still processing.",
            type=ErrorType.STILL_PROCESSING,
            next_retry_delay=timedelta(seconds=delay),
        )

    @activity.defn(name="store")
    def store(self, request: StoreAttachmentInput) -> StoredObject | None:
        """Stream an attachment from Mirror into storage, once.

        Returns None when the item was deleted meanwhile: what this run wrote
        is removed again so that a DELETE always wins.
        """
        attachment = request.attachment
        name = object_name(
            request.user_token,
            request.item_id,
            attachment.attachment_id,
            attachment.content_type,
        )
        metadata = {
            "mirror-user-token": request.user_token,
            "mirror-item-id": request.item_id,
            "mirror-attachment-id": attachment.attachment_id,
        }
        tombstone = tombstone_name(request.user_token, request.item_id)
        if self._exists(tombstone):
            return None

        with self._as_user(request.user_token) as credentials:
            try:
                with mirror.open_content(
                    credentials,
                    attachment.content_url,
                    timeout=self.mirror_timeout,
                ) as content:
                    stored = self._write(
                        name,
                        _heartbeating(content.chunks()),
                        content_type=attachment.content_type,
                        metadata=metadata,
                        expected_size=content.size,
                    )
            except mirror.HttpError as exc:
                if mirror.classify(exc) is Failure.GONE:
                    return None
                raise

        # A DELETE writes its tombstone before it removes the item's objects,
        # so whichever of the two finishes last sees the other's work.
        if self._exists(tombstone):
            self.storage.delete(name)
            return None

        return stored

    @activity.defn(name="store_location")
    def store_location(self, ref: LocationRef) -> StoredObject | None:
        """Fetch a location as its user and store it as JSON."""
        with self._as_user(ref.user_token) as credentials:
            try:
                request = self._mirror("locations").get(id=ref.location_id)
                location = self._execute(credentials, request)
            except mirror.HttpError as exc:
                if mirror.classify(exc) is Failure.GONE:
                    return None
                raise

        body = json.dumps(location, sort_keys=True).encode()
        name = location_object_name(ref.user_token, str(location["id"]))

        return self._write(
            name,
            iter([body]),
            content_type="application/json",
            metadata={
                "mirror-user-token": ref.user_token,
                "mirror-location-id": str(location["id"]),
            },
            expected_size=len(body),
        )

    @activity.defn(name="remove_item")
    def remove_item(self, ref: ItemRef) -> RemoveItemResult:
        """Remove everything stored for a deleted item, and keep it removed."""
        tombstone = tombstone_name(ref.user_token, ref.item_id)
        marker = json.dumps({"deleted": datetime.now(UTC).isoformat()}).encode()
        try:
            self.storage.write_if_absent(
                tombstone,
                iter([marker]),
                content_type="application/json",
                metadata={"mirror-item-id": ref.item_id},
            )
            removed = self.storage.delete_prefix(
                item_prefix(ref.user_token, ref.item_id)
            )
        except StorageError as exc:
            raise _storage_failure(exc) from exc

        return RemoveItemResult(removed=tuple(sorted(removed)))

    def _write(
        self,
        name: str,
        chunks: Iterator[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
        expected_size: int | None,
    ) -> StoredObject:
        try:
            return self.storage.write_if_absent(
                name,
                chunks,
                content_type=content_type,
                metadata=metadata,
                expected_size=expected_size,
            )
        except StorageError as exc:
            raise _storage_failure(exc) from exc

    def _exists(self, name: str) -> bool:
        try:
            return self.storage.exists(name)
        except StorageError as exc:
            raise _storage_failure(exc) from exc

    @contextmanager
    def _as_user(self, user_token: str) -> Iterator[Credentials]:
        """Yield a user's credentials; report failed Mirror calls; save refreshes."""
        subscriber = self.subscribers.find(user_token)
        if subscriber is None:
            raise ApplicationError(
                f"No subscriber has user token {user_token!r} any more; it was "
                "removed after the notification was verified.",
                type=ErrorType.UNKNOWN_SUBSCRIBER,
                non_retryable=True,
            )
        credentials = mirror.credentials_from_info(subscriber.credentials)
        token = credentials.token

        try:
            yield credentials
        except FailureError:
            # An ApplicationError raised below, or the cancellation the worker
            # raises in this thread when it stops: neither is Mirror's doing.
            raise
        except Exception as exc:
            raise mirror_failure(exc, user_token) from exc
        finally:
            if credentials.token != token:
                refreshed = credentials.to_json()  # type: ignore[no-untyped-call]
                self.subscribers.save_credentials(user_token, json.loads(refreshed))

    def _mirror(self, *path: str) -> Any:
        return mirror.shared_resource(self.mirror_root_url, *path)

    def _execute(self, credentials: Credentials, request: Any) -> Any:
        """Send a Mirror request as the credentials' user, on a fresh connection."""
        http = mirror.user_http(credentials, timeout=self.mirror_timeout)
        try:
            return request.execute(http=http)
        finally:
            http.close()


def mirror_failure(error: Exception, user_token: str) -> ApplicationError:
    """Return the ``ApplicationError`` that reports a failed Mirror call."""
    kind = mirror.classify(error)
    if kind is Failure.GONE:
        return ApplicationError(
            f"Mirror no longer has what user {user_token!r}'s notification "
            f"points at: {error}",
            type=ErrorType.MIRROR_GONE,
            non_retryable=True,
        )
    if kind is Failure.REVOKED:
        return ApplicationError(
            f"User {user_token!r} revoked mirrorflow's access to their Glass "
            "(invalid_grant). They must authorize it again; then re-add them "
            "with `mirrorflow subscribers add` and replay this run.",
            type=ErrorType.GRANT_REVOKED,
            non_retryable=True,
        )
    if kind is Failure.CLIENT_ERROR:
        return ApplicationError(
            f"Mirror refused the request for user {user_token!r}: {error}",
            type=ErrorType.MIRROR_CLIENT_ERROR,
            non_retryable=True,
        )

    return ApplicationError(
        f"Mirror is unavailable for user {user_token!r}: {error}",
        type=ErrorType.MIRROR_UNAVAILABLE,
    )


def _storage_failure(error: StorageError) -> ApplicationError:
    if isinstance(error, ChecksumMismatch):
        return ApplicationError(str(error), type=ErrorType.CHECKSUM_MISMATCH)
    if isinstance(error, StorageRejected):
        return ApplicationError(
            str(error), type=ErrorType.STORAGE_REJECTED, non_retryable=True
        )

    return ApplicationError(str(error), type=ErrorType.STORAGE_UNAVAILABLE)


def _heartbeating(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pass chunks through, heartbeating with the byte count now and then."""
    sent = 0
    last = time.monotonic()
    for chunk in chunks:
        sent += len(chunk)
        now = time.monotonic()
        if now - last >= HEARTBEAT_EVERY:
            activity.heartbeat(sent)
            last = now
        yield chunk
