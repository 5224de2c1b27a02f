"""Turn the body Mirror POSTs into a :class:`~workflows.models.Notification`.

The checks are written out by hand rather than left to a pydantic model so
that each rejection names Mirror's own field (``itemId``, ``userActions[1]
.type``) and says what came instead, and so that the hot path does no more
work than it needs. Fields Mirror may add later are ignored.

The ``verifyToken`` is replaced by its SHA-256 digest here, the first moment
the webhook holds it; its value is never quoted in an error message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from workflows.models import Notification, UserAction, sha256_hex

MAX_BODY_BYTES = 64 * 1024
"""The largest body accepted; a real notification is a few hundred bytes."""

MAX_USER_ACTIONS = 32

# The longest value accepted for each text field. Identifiers end up in
# search attributes and in the workflow id, both of which Temporal bounds.
_IDENTIFIERS = (
    ("collection", "collection", 64),
    ("itemId", "item_id", 256),
    ("operation", "operation", 64),
    ("userToken", "user_token", 256),
)
_MAX_VERIFY_TOKEN = 1024
_MAX_ACTION_TYPE = 64
_MAX_PAYLOAD = 4096
_MAX_QUOTED = 40

# JSON escapes can carry lone surrogates, which UTF-8, protobuf and so
# Temporal cannot; identifiers must not break a log line either.
_SURROGATES = re.compile("[\ud800-\udfff]")
_NOT_IN_IDENTIFIERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class NotificationError(ValueError):
    """The body is not a Mirror notification; the message says why."""

    reason = "invalid_notification"
    """The rejection reason the webhook counts this error under."""


class UnreadableBody(NotificationError):
    """The body is not UTF-8 JSON at all."""

    reason = "invalid_json"


def parse_notification(body: bytes) -> Notification:
    """Return the notification a request body holds.

    Raises:
        UnreadableBody: the body is not UTF-8 or not JSON.
        NotificationError: the JSON is not a Mirror notification; the message
            names the first wrong field.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableBody(
            f"The body is not UTF-8 text: byte {exc.start} is invalid."
        ) from None

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnreadableBody(f"The body is not valid JSON: {exc}.") from None
    except (ValueError, RecursionError):
        # Integers too long to convert, or arrays nested too deep to parse.
        raise UnreadableBody(
            "The body is not JSON that can be read: a number is too long "
            "or values are nested too deep."
        ) from None

    return notification_from(data)


def notification_from(data: Any) -> Notification:
    """Return the notification a decoded JSON value describes.

    Raises:
        NotificationError: a field is missing or has the wrong type or length.
    """
    if not isinstance(data, dict):
        raise NotificationError(
            "The body must be a JSON object (a Mirror notification), "
            f"got {_kind(data)}."
        )

    fields = {name: _identifier(data, key, limit) for key, name, limit in _IDENTIFIERS}
    verify_token = _verify_token(data.get("verifyToken"))
    user_actions = _user_actions(data.get("userActions"))

    return Notification(
        **fields,
        verify_token_sha256=None if verify_token is None else sha256_hex(verify_token),
        user_actions=user_actions,
    )


def _identifier(data: Mapping[str, Any], key: str, limit: int) -> str:
    if key not in data:
        raise NotificationError(f"{key} is missing; expected a non-empty string.")

    return _text(data[key], key, limit)


def _text(value: Any, where: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise NotificationError(
            f"{where} must be a non-empty string, got {_quote(value)}."
        )
    if len(value) > limit:
        raise NotificationError(
            f"{where} must be at most {limit} characters, got {len(value)}."
        )
    if _NOT_IN_IDENTIFIERS.search(value):
        raise NotificationError(
            f"{where} must be text without control characters or lone "
            f"surrogates, got {_quote(value)}."
        )

    return value


def _verify_token(value: Any) -> str | None:
    if value is None:
        return None
    # The value is a secret: describe it, never quote it.
    if not isinstance(value, str):
        raise NotificationError(
            f"verifyToken must be a string when present, got {_kind(value)}."
        )
    if len(value) > _MAX_VERIFY_TOKEN:
        raise NotificationError(
            f"verifyToken must be at most {_MAX_VERIFY_TOKEN} characters, "
            f"got {len(value)}."
        )
    if _SURROGATES.search(value):
        raise NotificationError("verifyToken must not contain lone surrogates.")

    return value


def _user_actions(value: Any) -> tuple[UserAction, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise NotificationError(
            f"userActions must be a list when present, got {_quote(value)}."
        )
    if len(value) > MAX_USER_ACTIONS:
        raise NotificationError(
            f"userActions must hold at most {MAX_USER_ACTIONS} actions, "
            f"got {len(value)}."
        )

    return tuple(
        _user_action(entry, f"userActions[{i}]") for i, entry in enumerate(value)
    )


def _user_action(entry: Any, where: str) -> UserAction:
    if not isinstance(entry, dict):
        raise NotificationError(
            f'{where} must be an object with a "type", got {_quote(entry)}.'
        )
    if "type" not in entry:
        raise NotificationError(
            f"{where}.type is missing; expected a non-empty string."
        )

    action_type = _text(entry["type"], f"{where}.type", _MAX_ACTION_TYPE)
    payload = entry.get("payload")
    if payload is not None:
        if not isinstance(payload, str):
            raise NotificationError(
                f"{where}.payload must be a string when present, got {_quote(payload)}."
            )
        if len(payload) > _MAX_PAYLOAD:
            raise NotificationError(
                f"{where}.payload must be at most {_MAX_PAYLOAD} characters, "
                f"got {len(payload)}."
            )
        if _SURROGATES.search(payload):
            raise NotificationError(
                f"{where}.payload must not contain lone surrogates."
            )

    return UserAction(type=action_type, payload=payload)


def _quote(value: Any) -> str:
    """Return a JSON value as it would appear in the body, cut short if long."""
    try:
        shown = json.dumps(value, ensure_ascii=True)
    except RecursionError:
        return "a value nested too deep to show"
    if len(shown) > _MAX_QUOTED:
        shown = shown[: _MAX_QUOTED - 3] + "..."

    return shown


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"

    return "an object"
