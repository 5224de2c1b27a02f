"""The admin API under ``/emulator/``: act as Glass users, inject faults, inspect.

Nothing here existed on Mirror. Tests, demos and benchmarks use it to create
users, put captured photos and videos on their timelines, perform user
actions (which deliver notifications), move them around, revoke their
grants, break the emulated endpoints on purpose and read what happened.
"""

from __future__ import annotations

import math
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from emulator import uploads
from emulator.api import base_url, emulator_of, json_response, read_json_body
from emulator.content import Blob, GeneratedBlob
from emulator.errors import bad_request, not_found
from emulator.resources import Attachment, TimelineItem
from emulator.state import Emulator, User

DEFAULT_SEED = "mirrorflow"
"""Seed of generated content when the request names none."""


def _user(request: Request) -> tuple[Emulator, User]:
    emulator = emulator_of(request)

    return emulator, emulator.user(request.path_params["userId"])


def _query_number(
    request: Request, name: str, *, integer: bool = False
) -> float | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise bad_request(
            f"{name} has value {value!r}; expected {kind}.", field=name
        ) from None
    if number < 0 or math.isnan(number):
        raise bad_request(f"{name} has value {value!r}; expected >= 0.", field=name)

    return number


def _attachment_json(request: Request, attachment: Attachment) -> dict[str, Any]:
    body = attachment.to_json(base_url(request))
    body.update(
        itemId=attachment.item_id,
        size=attachment.blob.size,
        sha256=attachment.blob.sha256,
    )
    if isinstance(attachment.blob, GeneratedBlob):
        body["seed"] = attachment.blob.seed

    return body


def _item_json(request: Request, item: TimelineItem) -> dict[str, Any]:
    return item.to_json(base_url(request))


async def _content_from(
    request: Request, emulator: Emulator
) -> tuple[str, Blob, float]:
    """Return the content type, content and processing time a request describes.

    The content is either the raw request body, streamed into storage, or
    generated: ``generatedSize`` bytes from ``seed``.
    """
    content_type = (
        (
            request.query_params.get("contentType")
            or request.headers.get("content-type")
            or ""
        )
        .split(";")[0]
        .strip()
    )
    if not content_type:
        raise bad_request(
            "The content has no type; pass ?contentType=image/jpeg (or another "
            "type) or a Content-Type header.",
            field="contentType",
        )
    processing = _query_number(request, "processingSeconds") or 0.0
    size = _query_number(request, "generatedSize", integer=True)
    if size is not None:
        seed = request.query_params.get("seed") or DEFAULT_SEED
        blob: Blob = await anyio.to_thread.run_sync(
            GeneratedBlob.create, int(size), seed
        )
        return content_type, blob, processing

    writer = emulator.blob_writer()
    try:
        await uploads.stream_body(request, writer, limit=None)
    except BaseException:
        writer.abort()
        raise

    return content_type, writer.finish(), processing


# Service


async def index(request: Request) -> Response:
    """Describe the emulator and where its parts are."""
    root = base_url(request)

    return json_response(
        {
            "name": "mirrorflow Mirror API emulator",
            "mirror": root + "mirror/v1/",
            "upload": root + "upload/mirror/v1/",
            "token": root + "oauth2/v4/token",
            "discovery": root + "discovery/v1/apis/mirror/v1/rest",
            "admin": root + "emulator/",
        }
    )


async def health(request: Request) -> Response:
    """Answer that the emulator is up."""
    emulator = emulator_of(request)

    return json_response(
        {
            "status": "ok",
            "users": len(emulator.users),
            "deliveries": emulator.deliverer.pending,
        }
    )


async def get_config(request: Request) -> Response:
    """Show the settings in force."""
    return json_response(emulator_of(request).config.to_json())


async def set_config(request: Request) -> Response:
    """Change some settings while running."""
    emulator = emulator_of(request)
    try:
        emulator.config = emulator.config.updated(await read_json_body(request))
    except ValueError as exc:
        raise bad_request(str(exc)) from None

    return json_response(emulator.config.to_json())


async def restore_config(request: Request) -> Response:
    """Go back to the settings the emulator started with."""
    emulator = emulator_of(request)
    emulator.config = emulator.initial_config

    return json_response(emulator.config.to_json())


async def reset(request: Request) -> Response:
    """Forget every user, item, subscription, fault and record."""
    emulator_of(request).reset()

    return Response(status_code=204)


# Users


async def create_user(request: Request) -> Response:
    """Create a Glass user and answer its ``authorized_user`` credentials."""
    emulator = emulator_of(request)
    body = await read_json_body(request)
    user = emulator.create_user(body.get("id"))

    return json_response(_user_json(request, emulator, user), 201)


def _user_json(request: Request, emulator: Emulator, user: User) -> dict[str, Any]:
    token_uri = base_url(request) + "oauth2/v4/token"

    return {
        "id": user.id,
        "revoked": user.revoked,
        "credentials": emulator.credentials(user, token_uri),
    }


async def list_users(request: Request) -> Response:
    """List the users."""
    emulator = emulator_of(request)
    users = [_user_json(request, emulator, user) for user in emulator.users.values()]

    return json_response({"items": users})


async def get_user(request: Request) -> Response:
    """Show one user."""
    emulator, user = _user(request)

    return json_response(_user_json(request, emulator, user))


async def revoke(request: Request) -> Response:
    """Revoke a user's grant: refreshing answers invalid_grant from now on."""
    emulator, user = _user(request)
    emulator.revoke(user)

    return json_response(_user_json(request, emulator, user))


async def expire_tokens(request: Request) -> Response:
    """Make a user's access tokens expire now; refreshing still works."""
    emulator, user = _user(request)

    return json_response({"expired": emulator.expire_tokens(user)})


async def list_tokens(request: Request) -> Response:
    """List the access tokens issued to a user, expired ones included."""
    emulator, user = _user(request)
    tokens = [
        {"token": token, "live": live} for token, live in emulator.access_tokens(user)
    ]

    return json_response({"items": tokens})


# Timeline, as captured on Glass


async def add_item(request: Request) -> Response:
    """Put an item on a user's timeline, without notifying anyone."""
    emulator, user = _user(request)
    item = emulator.insert_item(user, await read_json_body(request))

    return json_response(_item_json(request, item), 201)


async def get_item(request: Request) -> Response:
    """Show an item as its user's Glassware would, tombstones included."""
    emulator, user = _user(request)
    item = emulator.item(user, request.path_params["itemId"])

    return json_response(_item_json(request, item))


async def add_attachment(request: Request) -> Response:
    """Attach content to an item: the raw body, or generated content."""
    emulator, user = _user(request)
    item = emulator.live_item(user, request.path_params["itemId"])
    content_type, blob, processing = await _content_from(request, emulator)

    attachment = emulator.add_attachment(
        user, item, content_type, blob, processing_seconds=processing
    )

    return json_response(_attachment_json(request, attachment), 201)


async def act_on_item(request: Request) -> Response:
    """Perform a user action on an item and deliver its notifications."""
    emulator, user = _user(request)
    action = await read_json_body(request)

    item, notifications = emulator.act(user, request.path_params["itemId"], action)

    return json_response(
        {
            "item": _item_json(request, item),
            "notifications": [n.to_json() for n in notifications],
        }
    )


async def act(request: Request) -> Response:
    """Perform a user action that makes a new item, such as a voice command."""
    emulator, user = _user(request)
    action = await read_json_body(request)

    item, notifications = emulator.act(user, None, action)

    return json_response(
        {
            "item": _item_json(request, item),
            "notifications": [n.to_json() for n in notifications],
        }
    )


async def share(request: Request) -> Response:
    """Capture content on Glass and share it: one item, one attachment, SHARE."""
    emulator, user = _user(request)
    text = request.query_params.get("text")
    content_type, blob, processing = await _content_from(request, emulator)

    item = emulator.insert_item(user, {"text": text} if text else {})
    attachment = emulator.add_attachment(
        user, item, content_type, blob, processing_seconds=processing
    )
    item, notifications = emulator.act(user, item.id, {"type": "SHARE"})

    return json_response(
        {
            "item": _item_json(request, item),
            "attachment": _attachment_json(request, attachment),
            "notifications": [n.to_json() for n in notifications],
        },
        201,
    )


async def add_location(request: Request) -> Response:
    """Record a new location fix and notify location subscriptions."""
    emulator, user = _user(request)
    location, notifications = emulator.new_location(user, await read_json_body(request))

    return json_response(
        {
            "location": location.to_json(),
            "notifications": [n.to_json() for n in notifications],
        },
        201,
    )


async def add_subscription(request: Request) -> Response:
    """Subscribe a user's Glassware, as subscriptions.insert would."""
    emulator, user = _user(request)
    subscription = emulator.insert_subscription(user, await read_json_body(request))

    return json_response(subscription.to_json(), 201)


async def list_subscriptions(request: Request) -> Response:
    """List a user's subscriptions."""
    _, user = _user(request)
    items = [s.to_json() for s in user.subscriptions.values()]

    return json_response({"items": items})


# Faults and records


async def add_fault(request: Request) -> Response:
    """Inject a fault into the emulated Google endpoints."""
    fault = emulator_of(request).faults.add(await read_json_body(request))

    return json_response(fault.to_json(), 201)


async def list_faults(request: Request) -> Response:
    """List the faults in force, with how often each applied."""
    return json_response({"items": emulator_of(request).faults.to_json()})


async def clear_faults(request: Request) -> Response:
    """Remove every fault."""
    emulator_of(request).faults.clear()

    return Response(status_code=204)


async def remove_fault(request: Request) -> Response:
    """Remove one fault."""
    fault_id = request.path_params["faultId"]
    if not emulator_of(request).faults.remove(fault_id):
        raise not_found("Fault", fault_id)

    return Response(status_code=204)


def _after(request: Request) -> int:
    return int(_query_number(request, "after", integer=True) or 0)


async def deliveries(request: Request) -> Response:
    """List delivery attempts, oldest first, and how many are under way."""
    deliverer = emulator_of(request).deliverer
    attempts = deliverer.attempts(
        after=_after(request),
        user_id=request.query_params.get("userId"),
        delivery_id=request.query_params.get("deliveryId"),
    )

    return json_response({"items": attempts, "pending": deliverer.pending})


async def clear_deliveries(request: Request) -> Response:
    """Forget the recorded delivery attempts."""
    emulator_of(request).deliverer.clear()

    return Response(status_code=204)


async def requests(request: Request) -> Response:
    """List the calls made to the emulated Google endpoints, oldest first."""
    log = emulator_of(request).requests
    entries = log.entries(
        after=_after(request), user_id=request.query_params.get("userId")
    )

    return json_response({"items": entries, "lastSeq": log.last_seq()})


async def clear_requests(request: Request) -> Response:
    """Forget the recorded calls."""
    emulator_of(request).requests.clear()

    return Response(status_code=204)


def routes() -> list[BaseRoute]:
    """Return the admin API's routes."""
    users = "/emulator/users/{userId}"

    return [
        Route("/", index, methods=["GET"]),
        Route("/emulator/health", health, methods=["GET"]),
        Route("/emulator/config", get_config, methods=["GET"]),
        Route("/emulator/config", set_config, methods=["POST", "PATCH"]),
        Route("/emulator/config", restore_config, methods=["DELETE"]),
        Route("/emulator/reset", reset, methods=["POST"]),
        Route("/emulator/users", create_user, methods=["POST"]),
        Route("/emulator/users", list_users, methods=["GET"]),
        Route(users, get_user, methods=["GET"]),
        Route(users + "/revoke", revoke, methods=["POST"]),
        Route(users + "/expire-tokens", expire_tokens, methods=["POST"]),
        Route(users + "/tokens", list_tokens, methods=["GET"]),
        Route(users + "/timeline", add_item, methods=["POST"]),
        Route(users + "/timeline/{itemId}", get_item, methods=["GET"]),
        Route(
            users + "/timeline/{itemId}/attachments", add_attachment, methods=["POST"]
        ),
        Route(users + "/timeline/{itemId}/actions", act_on_item, methods=["POST"]),
        Route(users + "/actions", act, methods=["POST"]),
        Route(users + "/share", share, methods=["POST"]),
        Route(users + "/locations", add_location, methods=["POST"]),
        Route(users + "/subscriptions", add_subscription, methods=["POST"]),
        Route(users + "/subscriptions", list_subscriptions, methods=["GET"]),
        Route("/emulator/faults", add_fault, methods=["POST"]),
        Route("/emulator/faults", list_faults, methods=["GET"]),
        Route("/emulator/faults", clear_faults, methods=["DELETE"]),
        Route("/emulator/faults/{faultId}", remove_fault, methods=["DELETE"]),
        Route("/emulator/deliveries", deliveries, methods=["GET"]),
        Route("/emulator/deliveries", clear_deliveries, methods=["DELETE"]),
        Route("/emulator/requests", requests, methods=["GET"]),
        Route("/emulator/requests", clear_requests, methods=["DELETE"]),
    ]
