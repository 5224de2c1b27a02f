"""The data that flows into, through and out of ``NotificationWorkflow``.

These models are what Temporal records in workflow history, so they hold no
secret and no attachment byte: the verify token arrives as its SHA-256 digest,
and stored content is described by name, size and checksum.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)

WORKFLOW_NAME = "NotificationWorkflow"

USER_TOKEN = SearchAttributeKey.for_keyword("MirrorUserToken")
ITEM_ID = SearchAttributeKey.for_keyword("MirrorItemId")
COLLECTION = SearchAttributeKey.for_keyword("MirrorCollection")
OPERATION = SearchAttributeKey.for_keyword("MirrorOperation")
OUTCOME = SearchAttributeKey.for_keyword("MirrorOutcome")
SEARCH_ATTRIBUTES = (USER_TOKEN, ITEM_ID, COLLECTION, OPERATION, OUTCOME)


class Outcome(StrEnum):
    """How a notification's run ended, as recorded in ``MirrorOutcome``."""

    STORED = "stored"
    """Content was stored (or had been stored by an earlier run)."""
    REMOVED = "removed"
    """A DELETE removed what had been stored for the item."""
    REJECTED = "rejected"
    """The sender is not a known subscriber or its verify token is wrong."""
    GONE = "gone"
    """The item no longer exists or was deleted before it could be fetched."""
    IGNORED = "ignored"
    """Nothing to do: an unknown collection or action, or nothing to store."""


class ErrorType:
    """Stable ``ApplicationError`` types the activities raise."""

    GRANT_REVOKED = "MirrorGrantRevoked"
    MIRROR_CLIENT_ERROR = "MirrorClientError"
    MIRROR_GONE = "MirrorGone"
    MIRROR_UNAVAILABLE = "MirrorUnavailable"
    STILL_PROCESSING = "AttachmentStillProcessing"
    PROCESSING_TIMED_OUT = "AttachmentProcessingTimedOut"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    STORAGE_REJECTED = "StorageRejected"
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    UNKNOWN_SUBSCRIBER = "UnknownSubscriber"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UserAction(_Model):
    """One entry of a notification's ``userActions``."""

    type: str
    payload: str | None = None


class Notification(_Model):
    """A Mirror notification as the workflow sees it.

    ``verify_token_sha256`` is the hex SHA-256 digest of the ``verifyToken``
    Mirror echoed, or None when the ping carried none.
    """

    collection: str
    item_id: str
    operation: str
    user_token: str
    verify_token_sha256: str | None = None
    user_actions: tuple[UserAction, ...] = ()

    @property
    def action_types(self) -> tuple[str, ...]:
        """Return the types of the user actions, in order."""
        return tuple(action.type for action in self.user_actions)


class VerifyInput(_Model):
    """Who claims to have sent a notification."""

    user_token: str
    verify_token_sha256: str | None


class VerifyResult(_Model):
    """Whether the sender is a known subscriber with the right verify token."""

    accepted: bool
    reason: str = ""


class ItemRef(_Model):
    """A timeline item of one user."""

    user_token: str
    item_id: str


class Item(_Model):
    """What the pipeline needs to know of a timeline item."""

    item_id: str
    is_deleted: bool = False
    attachment_ids: tuple[str, ...] = ()


class AttachmentRef(_Model):
    """One attachment of one timeline item of one user."""

    user_token: str
    item_id: str
    attachment_id: str


class Attachment(_Model):
    """An attachment's metadata once its content is ready."""

    attachment_id: str
    content_type: str
    content_url: str


class StoreAttachmentInput(_Model):
    """An attachment to copy from Mirror into storage."""

    user_token: str
    item_id: str
    attachment: Attachment


class StoredObject(_Model):
    """An object in storage, described without its bytes."""

    name: str
    size: int = Field(ge=0)
    sha256: str
    content_type: str
    created: bool = True
    """False when an earlier run had already stored the same object."""


class LocationRef(_Model):
    """A location of one user (``latest`` for the newest fix)."""

    user_token: str
    location_id: str


class RemoveItemResult(_Model):
    """What a DELETE removed from storage."""

    removed: tuple[str, ...] = ()


class NotificationResult(_Model):
    """How a notification's run ended and what it left in storage."""

    outcome: Outcome
    stored: tuple[StoredObject, ...] = ()
    removed: tuple[str, ...] = ()
    detail: str = ""


def sha256_hex(text: str) -> str:
    """Return the hex SHA-256 digest of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(notification: Notification) -> str:
    """Return a notification as compact JSON with sorted keys.

    Its workflow id is a digest of this text, and the intake log stores it.
    The text is what ``json.dumps(notification.model_dump(mode="json"),
    sort_keys=True, separators=(",", ":"))`` gives, written out field by
    field because that costs half as much on the webhook's hot path;
    ``tests/test_models.py`` checks that the two agree.
    """
    actions = ",".join(
        '{"payload":' + _json_or_null(a.payload) + ',"type":' + json.dumps(a.type) + "}"
        for a in notification.user_actions
    )

    return (
        '{"collection":' + json.dumps(notification.collection)
        + ',"item_id":' + json.dumps(notification.item_id)
        + ',"operation":' + json.dumps(notification.operation)
        + ',"user_actions":[' + actions + "]"
        + ',"user_token":' + json.dumps(notification.user_token)
        + ',"verify_token_sha256":' + _json_or_null(notification.verify_token_sha256)
        + "}"
    )  # fmt: skip


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else json.dumps(value)


def workflow_id_for(notification: Notification, canonical: str | None = None) -> str:
    """Return the workflow id of a notification, derived from its content.

    Mirror's resends of a ping carry the same content, so they map to the same
    id and Temporal folds them into one run. The verify token's digest is part
    of the content: a spoofed copy of a genuine ping with a wrong token gets
    an id of its own and cannot claim the genuine one's. ``canonical`` is the
    notification's :func:`canonical_json`, for a caller that has it already.
    """
    if canonical is None:
        canonical = canonical_json(notification)
    digest = sha256_hex(canonical)[:32]

    return f"mirror-{notification.collection}-{digest}"


def search_attributes_for(notification: Notification) -> TypedSearchAttributes:
    """Return the search attributes a notification's run starts with.

    ``MirrorOutcome`` is missing on purpose: the workflow sets it when it ends.
    """
    return TypedSearchAttributes(
        [
            SearchAttributePair(USER_TOKEN, notification.user_token),
            SearchAttributePair(ITEM_ID, notification.item_id),
            SearchAttributePair(COLLECTION, notification.collection),
            SearchAttributePair(OPERATION, notification.operation),
        ]
    )
