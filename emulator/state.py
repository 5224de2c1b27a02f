"""Everything the emulator knows, in memory: users, tokens, timelines, faults.

:class:`Emulator` is the one object behind both the Mirror API and the admin
API. Its methods check what a request asks for and raise
:class:`~emulator.errors.ApiError` (or :class:`~emulator.errors.OAuthError`
for the token endpoint) the way Mirror answered; the HTTP layer only
translates.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from emulator.config import EmulatorConfig
from emulator.content import Blob, BlobWriter
from emulator.delivery import Deliverer, Notification
from emulator.errors import ApiError, OAuthError, bad_request, not_found, required
from emulator.faults import FaultTable, RequestLog
from emulator.resources import (
    COLLECTIONS,
    OPERATIONS,
    Attachment,
    Location,
    Subscription,
    TimelineItem,
    new_id,
    new_secret,
    now,
    parse_rfc3339,
    validate_item_fields,
)

SCOPES = (
    "https://www.googleapis.com/auth/glass.timeline",
    "https://www.googleapis.com/auth/glass.location",
)

REALM = 'Bearer realm="https://accounts.google.com/"'


@dataclass
class User:
    """A Glass user, with everything their Glassware can see."""

    id: str
    refresh_token: str
    created: datetime = field(default_factory=now)
    revoked: bool = False
    items: dict[str, TimelineItem] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    locations: list[Location] = field(default_factory=list)
    writes: Iterator[int] = field(default_factory=lambda: itertools.count(1))


@dataclass
class AccessToken:
    """A bearer token of one user."""

    user_id: str
    expires_at: float
    """``time.monotonic()`` at which the token stops working."""


@dataclass
class Upload:
    """A media upload: the call it completes and the content received so far."""

    method: str
    """timeline.insert, timeline.update or timeline.attachments.insert."""
    item_id: str | None
    metadata: dict[str, Any]
    content_type: str
    writer: BlobWriter
    user_id: str = ""
    total: int | None = None
    """The length announced by a resumable upload, once known."""


class Emulator:
    """The emulator's whole state and the rules that change it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.initial_config = config
        self.config = config
        self.users: dict[str, User] = {}
        self.faults = FaultTable()
        self.requests = RequestLog(config.record_limit)
        self.deliverer = Deliverer(lambda: self.config)
        self.uploads: dict[str, Upload] = {}
        """Resumable uploads under way, by session id."""
        self._refresh_tokens: dict[str, str] = {}
        self._access_tokens: dict[str, AccessToken] = {}
        self._content_dir: Path | None = None

    # Users and OAuth

    def create_user(self, user_id: str | None = None) -> User:
        """Create a Glass user with a fresh refresh token."""
        user_id = user_id or new_id()
        if not isinstance(user_id, str) or not user_id.strip():
            raise bad_request(
                f"User id {user_id!r} is not usable; expected a non-empty string.",
                field="id",
            )
        if user_id in self.users:
            raise ApiError(
                409,
                f"User {user_id!r} already exists; choose another id or omit it.",
                reason="duplicate",
            )
        user = User(id=user_id, refresh_token=new_secret("1//"))
        self.users[user_id] = user
        self._refresh_tokens[user.refresh_token] = user_id

        return user

    def user(self, user_id: str) -> User:
        """Return the user with this id (for the admin API)."""
        user = self.users.get(user_id)
        if user is None:
            raise not_found("User", user_id)

        return user

    def credentials(self, user: User, token_uri: str) -> dict[str, str]:
        """Return the user's credentials in Google's ``authorized_user`` format."""
        return {
            "type": "authorized_user",
            "client_id": self.config.client_id,
            "client_secret": self.config.client_secret,
            "refresh_token": user.refresh_token,
            "token_uri": token_uri,
        }

    def grant(self, form: Mapping[str, str]) -> dict[str, Any]:
        """Answer a token endpoint request: a refresh token for an access token.

        Raises:
            OAuthError: the request is malformed, the client is unknown, or the
                refresh token is unknown or revoked (``invalid_grant``).
        """
        grant_type = form.get("grant_type")
        if grant_type != "refresh_token":
            raise OAuthError(
                400,
                "unsupported_grant_type",
                f"Grant type {grant_type!r} is not supported; use 'refresh_token'.",
            )
        for name in ("client_id", "client_secret", "refresh_token"):
            if not form.get(name):
                raise OAuthError(400, "invalid_request", f"Missing parameter: {name}")
        if not (
            hmac.compare_digest(form["client_id"], self.config.client_id)
            and hmac.compare_digest(form["client_secret"], self.config.client_secret)
        ):
            raise OAuthError(401, "invalid_client", "The OAuth client was not found.")
        user_id = self._refresh_tokens.get(form["refresh_token"])
        user = self.users.get(user_id) if user_id else None
        if user is None or user.revoked:
            raise OAuthError(400, "invalid_grant", "Token has been expired or revoked.")

        token = new_secret("ya29.")
        lifetime = self.config.token_lifetime
        self._access_tokens[token] = AccessToken(user.id, time.monotonic() + lifetime)

        return {
            "access_token": token,
            "expires_in": max(1, round(lifetime)),
            "token_type": "Bearer",
            "scope": " ".join(SCOPES),
        }

    def authenticate(self, token: str | None) -> User:
        """Return the user a bearer token belongs to.

        Raises:
            ApiError: 401 when the token is missing, unknown, expired or revoked.
        """
        if not token:
            raise ApiError(
                401,
                "The request carries no credentials; send an OAuth 2.0 access "
                "token as 'Authorization: Bearer <token>'.",
                reason="required",
                location="Authorization",
                location_type="header",
                headers={"WWW-Authenticate": REALM},
            )
        access = self._access_tokens.get(token)
        if access is None or access.expires_at <= time.monotonic():
            raise ApiError(
                401,
                "Invalid Credentials: the access token is unknown, expired or "
                "revoked; refresh it at the token endpoint.",
                reason="authError",
                location="Authorization",
                location_type="header",
                headers={"WWW-Authenticate": REALM + ', error="invalid_token"'},
            )

        return self.users[access.user_id]

    def access_tokens(self, user: User) -> list[tuple[str, bool]]:
        """Return every access token issued to the user, and whether it still works."""
        clock = time.monotonic()

        return [
            (token, access.expires_at > clock)
            for token, access in self._access_tokens.items()
            if access.user_id == user.id
        ]

    def token_owner(self, token: str | None) -> str | None:
        """Return whose token this is, valid or not (for the request record)."""
        access = self._access_tokens.get(token or "")

        return access.user_id if access else None

    def refresh_token_owner(self, refresh_token: str | None) -> str | None:
        """Return whose refresh token this is (for the request record)."""
        return self._refresh_tokens.get(refresh_token or "")

    def revoke(self, user: User) -> None:
        """Revoke the user's grant: the refresh token and every access token."""
        user.revoked = True
        self.expire_tokens(user)

    def expire_tokens(self, user: User) -> int:
        """Make the user's live access tokens expire now; return how many there were.

        The tokens stay known, so a call that still carries one is recorded
        under its user.
        """
        clock = time.monotonic()
        live = [
            access
            for access in self._access_tokens.values()
            if access.user_id == user.id and access.expires_at > clock
        ]
        for access in live:
            access.expires_at = clock

        return len(live)

    # Timeline

    def insert_item(self, user: User, body: Mapping[str, Any]) -> TimelineItem:
        """Add an item to the user's timeline."""
        fields = validate_item_fields(dict(body))
        moment = now()
        item = TimelineItem(
            id=new_id(),
            created=moment,
            updated=moment,
            write=next(user.writes),
            fields={k: v for k, v in fields.items() if v is not None},
        )
        user.items[item.id] = item

        return item

    def item(self, user: User, item_id: str) -> TimelineItem:
        """Return one of the user's items, deleted ones included."""
        item = user.items.get(item_id)
        if item is None:
            raise not_found("Timeline item", item_id)

        return item

    def live_item(self, user: User, item_id: str) -> TimelineItem:
        """Return one of the user's items that is not deleted."""
        item = self.item(user, item_id)
        if item.is_deleted:
            raise not_found("Timeline item", item_id)

        return item

    def list_items(
        self,
        user: User,
        *,
        include_deleted: bool = False,
        pinned_only: bool = False,
        bundle_id: str | None = None,
        source_item_id: str | None = None,
        order_by: str | None = None,
        max_results: int | None = None,
        page_token: str | None = None,
    ) -> tuple[list[TimelineItem], str | None]:
        """Return one page of the user's timeline and the next page's token."""
        if order_by not in (None, "displayTime", "writeTime"):
            raise bad_request(
                f"orderBy has value {order_by!r}; expected 'displayTime' or "
                "'writeTime'.",
                field="orderBy",
            )
        size = self.config.page_size if max_results is None else max_results
        if size <= 0:
            raise bad_request(
                f"maxResults has value {size}; expected a positive number.",
                field="maxResults",
            )
        start = _decode_page_token(page_token)

        items = [
            item
            for item in user.items.values()
            if (include_deleted or not item.is_deleted)
            and (not pinned_only or item.fields.get("isPinned") is True)
            and (bundle_id is None or item.fields.get("bundleId") == bundle_id)
            and (
                source_item_id is None
                or item.fields.get("sourceItemId") == source_item_id
            )
        ]
        if order_by == "writeTime":
            items.sort(key=lambda item: item.write, reverse=True)
        else:
            items.sort(key=lambda item: (item.display_time, item.write), reverse=True)
        page = items[start : start + size]
        more = start + size < len(items)

        return page, _encode_page_token(start + size) if more else None

    def update_item(
        self, user: User, item_id: str, body: Mapping[str, Any]
    ) -> TimelineItem:
        """Replace an item's fields with those of ``body``."""
        item = self.live_item(user, item_id)
        fields = validate_item_fields(dict(body))
        item.fields = {k: v for k, v in fields.items() if v is not None}
        self.touch(user, item)

        return item

    def patch_item(
        self, user: User, item_id: str, body: Mapping[str, Any]
    ) -> TimelineItem:
        """Change the fields ``body`` names; a null removes a field."""
        item = self.live_item(user, item_id)
        for name, value in validate_item_fields(dict(body)).items():
            if value is None:
                item.fields.pop(name, None)
            else:
                item.fields[name] = value
        self.touch(user, item)

        return item

    def delete_item(self, user: User, item_id: str) -> TimelineItem:
        """Delete an item, leaving a tombstone, and release its content."""
        item = self.live_item(user, item_id)
        for attachment in item.attachments:
            attachment.blob.discard()
        item.attachments = []
        item.fields = {}
        item.is_deleted = True
        self.touch(user, item)

        return item

    def touch(self, user: User, item: TimelineItem) -> None:
        """Record that an item was just written."""
        item.updated = now()
        item.write = next(user.writes)

    # Attachments

    def add_attachment(
        self,
        user: User,
        item: TimelineItem,
        content_type: str,
        blob: Blob,
        *,
        processing_seconds: float = 0.0,
    ) -> Attachment:
        """Attach content to an item; it may stay processing for a while."""
        attachment = Attachment(
            id=new_id(),
            item_id=item.id,
            content_type=content_type,
            blob=blob,
            ready_at=time.monotonic() + processing_seconds,
        )
        item.attachments.append(attachment)
        self.touch(user, item)

        return attachment

    def attachment(self, user: User, item_id: str, attachment_id: str) -> Attachment:
        """Return an attachment of one of the user's live items."""
        found = self.live_item(user, item_id).attachment(attachment_id)
        if found is None:
            raise not_found("Attachment", attachment_id)

        return found

    def delete_attachment(self, user: User, item_id: str, attachment_id: str) -> None:
        """Remove an attachment from its item and release its content."""
        item = self.live_item(user, item_id)
        attachment = self.attachment(user, item_id, attachment_id)
        item.attachments.remove(attachment)
        attachment.blob.discard()
        self.touch(user, item)

    def content_dir(self) -> Path:
        """Return the folder for content too large to keep in memory."""
        if self._content_dir is None:
            self._content_dir = Path(tempfile.mkdtemp(prefix="mirror-emulator-"))

        return self._content_dir

    def blob_writer(self) -> BlobWriter:
        """Return a writer for new content, spilling to disk when it grows."""
        return BlobWriter(self.content_dir(), self.config.memory_limit_bytes)

    # Subscriptions

    def insert_subscription(self, user: User, body: Mapping[str, Any]) -> Subscription:
        """Subscribe the user's Glassware to a collection."""
        subscription = self._subscription(new_id(), body)
        user.subscriptions[subscription.id] = subscription

        return subscription

    def update_subscription(
        self, user: User, subscription_id: str, body: Mapping[str, Any]
    ) -> Subscription:
        """Replace a subscription with the one ``body`` describes."""
        if subscription_id not in user.subscriptions:
            raise not_found("Subscription", subscription_id)
        subscription = self._subscription(subscription_id, body)
        user.subscriptions[subscription_id] = subscription

        return subscription

    def delete_subscription(self, user: User, subscription_id: str) -> None:
        """Remove a subscription."""
        if user.subscriptions.pop(subscription_id, None) is None:
            raise not_found("Subscription", subscription_id)

    def _subscription(
        self, subscription_id: str, body: Mapping[str, Any]
    ) -> Subscription:
        collection = body.get("collection")
        if not collection:
            raise required("collection")
        if collection not in COLLECTIONS:
            raise bad_request(
                f"collection has value {collection!r}; expected one of "
                f"{', '.join(COLLECTIONS)}.",
                field="collection",
            )
        callback_url = body.get("callbackUrl")
        if not callback_url:
            raise required("callbackUrl")
        self._check_callback_url(callback_url)
        operation = body.get("operation") or []
        if not isinstance(operation, list) or any(
            op not in OPERATIONS for op in operation
        ):
            raise bad_request(
                f"operation has value {operation!r}; expected a list of "
                f"{', '.join(OPERATIONS)} (empty for all).",
                field="operation",
            )
        tokens = {name: body.get(name) for name in ("userToken", "verifyToken")}
        for name, value in tokens.items():
            if value is not None and not isinstance(value, str):
                raise bad_request(
                    f"{name} has value {value!r}; expected a string.", field=name
                )

        return Subscription(
            id=subscription_id,
            collection=collection,
            callback_url=callback_url,
            operation=list(dict.fromkeys(operation)),
            user_token=tokens["userToken"],
            verify_token=tokens["verifyToken"],
            updated=now(),
        )

    def _check_callback_url(self, url: Any) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request(
                f"callbackUrl has value {url!r}; expected an absolute https:// URL.",
                field="callbackUrl",
            )
        if parts.scheme == "http" and not (
            self.config.allow_http or _is_loopback(parts.hostname)
        ):
            raise bad_request(
                f"callbackUrl has value {url!r}; Mirror delivers only to https:// "
                "URLs (http:// is accepted for loopback hosts, or everywhere "
                "with the emulator's allow_http setting).",
                field="callbackUrl",
            )

    # Locations

    def add_location(self, user: User, body: Mapping[str, Any]) -> Location:
        """Record a new location fix of the user."""
        coordinates: dict[str, float | None] = {}
        for name in ("latitude", "longitude", "accuracy"):
            value = body.get(name)
            if value is None and name != "accuracy":
                raise required(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise bad_request(
                    f"{name} has value {value!r}; expected a number.", field=name
                )
            coordinates[name] = None if value is None else float(value)
        texts: dict[str, str | None] = {}
        for name in ("displayName", "address"):
            value = body.get(name)
            if value is not None and not isinstance(value, str):
                raise bad_request(
                    f"{name} has value {value!r}; expected a string.", field=name
                )
            texts[name] = value
        stamp = body.get("timestamp")

        location = Location(
            id=new_id(),
            timestamp=parse_rfc3339(stamp, "timestamp") if stamp else now(),
            latitude=coordinates["latitude"] or 0.0,
            longitude=coordinates["longitude"] or 0.0,
            accuracy=coordinates["accuracy"],
            display_name=texts["displayName"],
            address=texts["address"],
        )
        user.locations.append(location)

        return location

    def location(self, user: User, location_id: str) -> Location:
        """Return one of the user's location fixes; ``latest`` is the newest."""
        if location_id == "latest" and user.locations:
            return max(user.locations, key=lambda location: location.timestamp)
        found = next((loc for loc in user.locations if loc.id == location_id), None)
        if found is None:
            raise not_found("Location", location_id)

        return found

    # User actions

    def act(
        self,
        user: User,
        item_id: str | None,
        action: Mapping[str, Any],
    ) -> tuple[TimelineItem, list[Notification]]:
        """Perform a user action on Glass and notify the user's subscriptions.

        ``action`` holds ``type``, an optional ``payload``, an optional
        ``text`` (what the user said, for replies and voice commands) and an
        optional ``operation`` that overrides the one Mirror would send.
        Without an item, the action creates one (a voice command's note).
        """
        kind = action.get("type")
        if not isinstance(kind, str) or not kind:
            raise bad_request(
                f"Action type {kind!r} is not usable; expected a string such as "
                "'SHARE', 'REPLY' or 'CUSTOM'.",
                field="type",
            )
        payload = action.get("payload")
        if payload is not None and not isinstance(payload, str):
            raise bad_request(
                f"Action payload {payload!r} is not a string.", field="payload"
            )
        text = action.get("text")

        actions: list[dict[str, str]] = [{"type": kind}]
        if payload is not None and kind not in ("REPLY", "REPLY_ALL"):
            actions[0]["payload"] = payload
        if item_id is None:
            item = self.insert_item(user, {"text": text or payload or ""})
            operation = "INSERT"
        elif kind in ("REPLY", "REPLY_ALL"):
            item = self._reply(
                user, self.live_item(user, item_id), kind, text or payload
            )
            operation = "INSERT"
        elif kind == "DELETE":
            item = self.delete_item(user, item_id)
            operation = "DELETE"
        else:
            item = self.live_item(user, item_id)
            self._apply(user, item, kind, payload)
            operation = "UPDATE"
        operation = action.get("operation") or operation

        notifications = self.deliverer.send(
            user.id,
            user.subscriptions.values(),
            collection="timeline",
            item_id=item.id,
            operation=operation,
            user_actions=actions,
        )

        return item, notifications

    def _reply(
        self, user: User, original: TimelineItem, kind: str, text: str | None
    ) -> TimelineItem:
        recipients: list[Any] = []
        creator = original.fields.get("creator")
        if creator:
            recipients.append(creator)
        if kind == "REPLY_ALL":
            recipients.extend(original.fields.get("recipients") or [])

        return self.insert_item(
            user,
            {
                "inReplyTo": original.id,
                "text": text or "Reply from Glass",
                "recipients": recipients,
            },
        )

    def _apply(
        self, user: User, item: TimelineItem, kind: str, payload: str | None
    ) -> None:
        if kind in ("PIN", "UNPIN"):
            item.fields["isPinned"] = kind == "PIN"
            self.touch(user, item)
        elif kind == "CUSTOM":
            if not payload:
                raise bad_request(
                    "A CUSTOM action needs the chosen menu item's id as payload.",
                    field="payload",
                )
            menu = item.fields.get("menuItems") or []
            kept = [
                entry
                for entry in menu
                if not (entry.get("id") == payload and entry.get("removeWhenSelected"))
            ]
            if len(kept) != len(menu):
                item.fields["menuItems"] = kept
                self.touch(user, item)

    def new_location(
        self, user: User, body: Mapping[str, Any]
    ) -> tuple[Location, list[Notification]]:
        """Record a location fix and notify the user's location subscriptions."""
        location = self.add_location(user, body)
        notifications = self.deliverer.send(
            user.id,
            user.subscriptions.values(),
            collection="locations",
            item_id="latest",
            operation="UPDATE",
        )

        return location, notifications

    # Lifecycle

    def reset(self) -> None:
        """Forget everything: users, content, faults, records, deliveries."""
        self.deliverer.cancel()
        self.deliverer.clear()
        self._release_content()
        self.users.clear()
        self.uploads.clear()
        self._refresh_tokens.clear()
        self._access_tokens.clear()
        self.faults.clear()
        self.requests.clear()
        self.config = self.initial_config

    async def close(self) -> None:
        """Stop deliveries and delete stored content."""
        await self.deliverer.close()
        self._release_content()
        if self._content_dir is not None:
            shutil.rmtree(self._content_dir, ignore_errors=True)
            self._content_dir = None

    def _release_content(self) -> None:
        for user in self.users.values():
            for item in user.items.values():
                for attachment in item.attachments:
                    attachment.blob.discard()
        for session in self.uploads.values():
            session.writer.abort()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_page_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        offset = int(text.removeprefix("offset:"))
        if not text.startswith("offset:") or offset < 0:
            raise ValueError
    except (ValueError, binascii.Error):
        raise bad_request(
            f"pageToken has value {token!r}, which no list returned; pass the "
            "nextPageToken of the previous page.",
            field="pageToken",
        ) from None

    return offset
