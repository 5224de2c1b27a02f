"""Mirror's resources as the emulator keeps them, and their JSON form.

Field names, kinds and shapes follow Mirror v1's discovery document: a
timeline item renders as ``mirror#timelineItem`` with ``id``, ``selfLink``,
``created``, ``updated`` (RFC 3339, UTC, milliseconds), ``etag`` and the
fields its writer set; a deleted one keeps only ``kind``, ``id`` and
``isDeleted``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from emulator.content import Blob
from emulator.errors import bad_request

ITEM_WRITABLE: dict[str, type | str] = {
    "bundleId": str,
    "canonicalUrl": str,
    "creator": dict,
    "displayTime": "date-time",
    "html": str,
    "inReplyTo": str,
    "isBundleCover": bool,
    "isPinned": bool,
    "location": dict,
    "menuItems": list,
    "notification": dict,
    "pinScore": int,
    "recipients": list,
    "sourceItemId": str,
    "speakableText": str,
    "speakableType": str,
    "text": str,
    "title": str,
}
"""The fields of a timeline item its writer sets, with their JSON types."""

_JSON_NAMES = {
    "str": "string",
    "bool": "boolean",
    "int": "integer",
    "dict": "object",
    "list": "array",
}

ITEM_READ_ONLY = frozenset(
    {"kind", "id", "selfLink", "created", "updated", "etag", "isDeleted", "attachments"}
)
"""Fields the server owns; a request may carry them but they are ignored."""

COLLECTIONS = ("timeline", "locations", "settings")
OPERATIONS = ("INSERT", "UPDATE", "DELETE", "MENU_ACTION")
MEDIA_TYPES = ("audio/", "image/", "video/")


def now() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """Return ``moment`` as Google wrote times: UTC, milliseconds, ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_rfc3339(value: Any, name: str) -> datetime:
    """Return the time an RFC 3339 string names.

    Raises:
        ApiError: the value is not an RFC 3339 date-time with a time zone.
    """
    try:
        if not isinstance(value, str):
            raise ValueError
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(
            f"Field {name!r} has value {value!r}; expected an RFC 3339 date-time "
            "such as '2014-05-01T12:00:00.000Z'.",
            field=name,
        ) from None
    if moment.tzinfo is None:
        raise bad_request(
            f"Field {name!r} has value {value!r} without a time zone; add 'Z' "
            "or an offset.",
            field=name,
        )

    return moment


def new_id() -> str:
    """Return a fresh resource id."""
    return str(uuid.uuid4())


def new_secret(prefix: str = "") -> str:
    """Return a fresh unguessable token."""
    return prefix + secrets.token_urlsafe(32)


def is_media_type(content_type: str) -> bool:
    """Tell whether Mirror accepts ``content_type`` as media (audio, image, video)."""
    return content_type.lower().startswith(MEDIA_TYPES)


def validate_item_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Return the writable fields of a timeline item request body.

    Raises:
        ApiError: a field is unknown or has the wrong JSON type.
    """
    fields: dict[str, Any] = {}
    for name, value in body.items():
        if name in ITEM_READ_ONLY:
            continue
        expected = ITEM_WRITABLE.get(name)
        if expected is None:
            raise bad_request(
                f"Unknown timeline item field {name!r}; expected one of "
                f"{', '.join(sorted(ITEM_WRITABLE))}.",
                field=name,
            )
        if value is None:
            fields[name] = None
            continue
        if expected == "date-time":
            parse_rfc3339(value, name)
        elif not _is_json_type(value, expected):
            kind = _JSON_NAMES[getattr(expected, "__name__", "")]
            raise bad_request(
                f"Field {name!r} has value {value!r}; expected a JSON {kind}.",
                field=name,
            )
        if name in ("menuItems", "recipients") and not all(
            isinstance(entry, dict) for entry in value
        ):
            raise bad_request(
                f"Field {name!r} must be a list of objects, got {value!r}.", field=name
            )
        fields[name] = value

    return fields


def _is_json_type(value: Any, expected: type | str) -> bool:
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)

    return isinstance(value, expected) if isinstance(expected, type) else False


@dataclass
class Attachment:
    """An attachment of a timeline item, with its content."""

    id: str
    item_id: str
    content_type: str
    blob: Blob
    ready_at: float = 0.0
    """``time.monotonic()`` after which the content is no longer processing."""

    @property
    def is_processing(self) -> bool:
        """Tell whether the content is still being processed."""
        return time.monotonic() < self.ready_at

    @property
    def processing_left(self) -> float:
        """Return the seconds until the content is ready (0 when it is)."""
        return max(0.0, self.ready_at - time.monotonic())

    def content_path(self) -> str:
        """Return the path of the content download route for this attachment."""
        return (
            f"/content/timeline/{quote(self.item_id, safe='')}"
            f"/attachments/{quote(self.id, safe='')}"
        )

    def to_json(self, base_url: str) -> dict[str, Any]:
        """Return the Attachment resource."""
        body: dict[str, Any] = {"id": self.id, "contentType": self.content_type}
        if self.is_processing:
            body["isProcessingContent"] = True
        else:
            body["contentUrl"] = base_url.rstrip("/") + self.content_path()
            body["isProcessingContent"] = False

        return body


@dataclass
class TimelineItem:
    """A card on a user's timeline."""

    id: str
    created: datetime
    updated: datetime
    write: int
    """Position in the user's sequence of writes; orders ``writeTime`` lists."""
    fields: dict[str, Any] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    is_deleted: bool = False

    @property
    def display_time(self) -> datetime:
        """Return the time the card shows: its displayTime, else its creation."""
        value = self.fields.get("displayTime")

        return parse_rfc3339(value, "displayTime") if value else self.created

    def attachment(self, attachment_id: str) -> Attachment | None:
        """Return the attachment with this id, if the item has it."""
        return next((a for a in self.attachments if a.id == attachment_id), None)

    def etag(self) -> str:
        """Return the item's current ETag."""
        digest = hashlib.sha256(f"{self.id}/{self.write}".encode()).hexdigest()

        return f'"{digest[:27]}"'

    def to_json(self, base_url: str) -> dict[str, Any]:
        """Return the TimelineItem resource (a tombstone once deleted)."""
        if self.is_deleted:
            return {"kind": "mirror#timelineItem", "id": self.id, "isDeleted": True}

        body: dict[str, Any] = {
            "kind": "mirror#timelineItem",
            "id": self.id,
            "selfLink": f"{base_url.rstrip('/')}/mirror/v1/timeline/{self.id}",
            "created": rfc3339(self.created),
            "updated": rfc3339(self.updated),
            "displayTime": rfc3339(self.display_time),
            "etag": self.etag(),
        }
        body.update((k, v) for k, v in self.fields.items() if v is not None)
        if self.attachments:
            body["attachments"] = [a.to_json(base_url) for a in self.attachments]

        return body


@dataclass
class Subscription:
    """A subscription of one user's Glassware to a collection."""

    id: str
    collection: str
    callback_url: str
    operation: list[str]
    user_token: str | None
    verify_token: str | None
    updated: datetime

    def matches(self, collection: str, operation: str) -> bool:
        """Tell whether a change of ``collection`` by ``operation`` concerns it."""
        return self.collection == collection and (
            not self.operation or operation in self.operation
        )

    def to_json(self) -> dict[str, Any]:
        """Return the Subscription resource."""
        body: dict[str, Any] = {
            "kind": "mirror#subscription",
            "id": self.id,
            "collection": self.collection,
            "operation": list(self.operation),
            "callbackUrl": self.callback_url,
            "updated": rfc3339(self.updated),
        }
        if self.user_token is not None:
            body["userToken"] = self.user_token
        if self.verify_token is not None:
            body["verifyToken"] = self.verify_token

        return body


@dataclass
class Location:
    """One location fix of a user."""

    id: str
    timestamp: datetime
    latitude: float
    longitude: float
    accuracy: float | None = None
    display_name: str | None = None
    address: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the Location resource."""
        body: dict[str, Any] = {
            "kind": "mirror#location",
            "id": self.id,
            "timestamp": rfc3339(self.timestamp),
            "latitude": self.latitude,
            "longitude": self.longitude,
        }
        if self.accuracy is not None:
            body["accuracy"] = self.accuracy
        if self.display_name is not None:
            body["displayName"] = self.display_name
        if self.address is not None:
            body["address"] = self.address

        return body
