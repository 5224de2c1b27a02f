"""The Mirror v1 REST surface: timeline, attachments, subscriptions, locations.

Paths, parameters and JSON follow Mirror's discovery document: the API under
``/mirror/v1/``, media upload under ``/upload/mirror/v1/`` (and
``/resumable/upload/mirror/v1/``), the token endpoint at
``/oauth2/v4/token``. Attachment content is served at each attachment's
``contentUrl`` (``/content/timeline/{itemId}/attachments/{attachmentId}``)
and by ``timeline.attachments.get`` with ``alt=media``; both stream the same
bytes and honour a single ``Range``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from emulator import uploads
from emulator.content import BlobWriter
from emulator.errors import JSON_MEDIA_TYPE, ApiError, OAuthError, bad_request
from emulator.resources import Attachment, TimelineItem, new_secret
from emulator.state import Emulator, Upload, User

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_MAX_JSON_BYTES = 1024 * 1024


def emulator_of(request: Request) -> Emulator:
    """Return the emulator behind the app serving ``request``."""
    emulator: Emulator = request.app.state.emulator

    return emulator


def base_url(request: Request) -> str:
    """Return the base URL links point at, ending in ``/``."""
    configured = emulator_of(request).config.public_url
    url = configured or str(request.base_url)

    return url if url.endswith("/") else url + "/"


def json_response(
    body: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """Return ``body`` as a JSON response, typed the way Google typed it."""
    return JSONResponse(
        body, status_code=status_code, headers=headers, media_type=JSON_MEDIA_TYPE
    )


def bearer_token(request: Request) -> str | None:
    """Return the access token a request carries, in its header or query."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()

    return request.query_params.get("oauth_token") or request.query_params.get(
        "access_token"
    )


def authenticate(
    request: Request, *, media_download: bool = False
) -> tuple[Emulator, User]:
    """Return the emulator and the user whose token authorizes ``request``.

    Also check the ``alt`` parameter: ``json``, or ``media`` where the method
    supports media download.
    """
    emulator = emulator_of(request)
    user = emulator.authenticate(bearer_token(request))
    request.scope["emulator.user_id"] = user.id

    alt = request.query_params.get("alt", "json")
    if alt != "json" and not (media_download and alt == "media"):
        expected = "'json' or 'media'" if media_download else "'json'"
        raise bad_request(f"alt has value {alt!r}; expected {expected}.", field="alt")

    return emulator, user


async def read_json_body(request: Request) -> dict[str, Any]:
    """Return the JSON object a request carries."""
    return uploads.read_json(await uploads.read_body(request, _MAX_JSON_BYTES))


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false"):
        raise bad_request(
            f"{name} has value {value!r}; expected true or false.", field=name
        )

    return value == "true"


def _integer(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise bad_request(
            f"{name} has value {value!r}; expected a whole number.", field=name
        )

    return int(value)


def item_response(
    request: Request, item: TimelineItem, status_code: int = 200
) -> Response:
    """Return a timeline item as the API answers it, with its ETag."""
    body = item.to_json(base_url(request))
    headers = {"ETag": body["etag"]} if "etag" in body else None

    return json_response(body, status_code, headers)


# Timeline


async def timeline_insert(request: Request) -> Response:
    """Handle timeline.insert without media."""
    emulator, user = authenticate(request)

    return item_response(
        request, emulator.insert_item(user, await read_json_body(request))
    )


async def timeline_list(request: Request) -> Response:
    """Handle timeline.list."""
    emulator, user = authenticate(request)
    query = request.query_params

    items, next_token = emulator.list_items(
        user,
        include_deleted=_flag(request, "includeDeleted"),
        pinned_only=_flag(request, "pinnedOnly"),
        bundle_id=query.get("bundleId"),
        source_item_id=query.get("sourceItemId"),
        order_by=query.get("orderBy"),
        max_results=_integer(request, "maxResults"),
        page_token=query.get("pageToken"),
    )
    body: dict[str, Any] = {
        "kind": "mirror#timeline",
        "items": [item.to_json(base_url(request)) for item in items],
    }
    if next_token is not None:
        body["nextPageToken"] = next_token

    return json_response(body)


async def timeline_get(request: Request) -> Response:
    """Handle timeline.get; a deleted item answers its tombstone."""
    emulator, user = authenticate(request)

    return item_response(request, emulator.item(user, request.path_params["id"]))


async def timeline_update(request: Request) -> Response:
    """Handle timeline.update without media."""
    emulator, user = authenticate(request)
    body = await read_json_body(request)

    return item_response(
        request, emulator.update_item(user, request.path_params["id"], body)
    )


async def timeline_patch(request: Request) -> Response:
    """Handle timeline.patch."""
    emulator, user = authenticate(request)
    body = await read_json_body(request)

    return item_response(
        request, emulator.patch_item(user, request.path_params["id"], body)
    )


async def timeline_delete(request: Request) -> Response:
    """Handle timeline.delete: the item becomes a tombstone."""
    emulator, user = authenticate(request)
    emulator.delete_item(user, request.path_params["id"])

    return Response(status_code=204)


# Attachments


async def attachments_list(request: Request) -> Response:
    """Handle timeline.attachments.list."""
    emulator, user = authenticate(request)
    item = emulator.live_item(user, request.path_params["itemId"])

    return json_response(
        {
            "kind": "mirror#attachmentsList",
            "items": [a.to_json(base_url(request)) for a in item.attachments],
        }
    )


async def attachments_get(request: Request) -> Response:
    """Handle timeline.attachments.get, with its media download (alt=media)."""
    emulator, user = authenticate(request, media_download=True)
    attachment = emulator.attachment(
        user, request.path_params["itemId"], request.path_params["attachmentId"]
    )
    if request.query_params.get("alt") == "media":
        return content_response(request, emulator, attachment)

    return json_response(attachment.to_json(base_url(request)))


async def attachments_delete(request: Request) -> Response:
    """Handle timeline.attachments.delete."""
    emulator, user = authenticate(request)
    emulator.delete_attachment(
        user, request.path_params["itemId"], request.path_params["attachmentId"]
    )

    return Response(status_code=204)


async def attachments_insert_without_media(request: Request) -> Response:
    """Refuse timeline.attachments.insert on the metadata path, as Mirror did."""
    authenticate(request)
    item_id = request.path_params["itemId"]

    raise bad_request(
        "timeline.attachments.insert takes media only; POST it to "
        f"/upload/mirror/v1/timeline/{item_id}/attachments?uploadType=media.",
    )


async def content_download(request: Request) -> Response:
    """Serve an attachment's content at its contentUrl."""
    emulator, user = authenticate(request)
    attachment = emulator.attachment(
        user, request.path_params["itemId"], request.path_params["attachmentId"]
    )

    return content_response(request, emulator, attachment)


def content_response(
    request: Request, emulator: Emulator, attachment: Attachment
) -> Response:
    """Stream an attachment's content, or the part a ``Range`` asks for."""
    if attachment.is_processing:
        wait = math.ceil(attachment.processing_left)
        raise ApiError(
            503,
            f"Attachment {attachment.id!r} is still being processed; its content "
            f"is not available yet. Try again in {wait} s.",
            reason="backendError",
            headers={"Retry-After": str(wait)},
        )
    blob = attachment.blob
    start, stop, partial = _byte_range(request.headers.get("range"), blob.size)

    headers = {
        "Content-Length": str(stop - start),
        "Accept-Ranges": "bytes",
        "ETag": f'"{blob.sha256}"',
    }
    if partial:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"

    return StreamingResponse(
        blob.chunks(start, stop, emulator.config.chunk_bytes),
        status_code=206 if partial else 200,
        headers=headers,
        media_type=attachment.content_type,
    )


def _byte_range(header: str | None, size: int) -> tuple[int, int, bool]:
    found = _RANGE.match(header.strip()) if header else None
    if found is None or found.groups() == ("", ""):
        # No range, or one this emulator does not serve (several ranges):
        # answering the whole content is what HTTP allows.
        return 0, size, False
    first, last = found.groups()
    if first == "":
        start, stop = max(0, size - int(last)), size
    else:
        start = int(first)
        stop = min(size, int(last) + 1) if last else size
    if start >= stop:
        raise ApiError(
            416,
            f"Range {header!r} is outside the content's {size} bytes.",
            headers={"Content-Range": f"bytes */{size}"},
        )

    return start, stop, True


# Media upload


async def upload(request: Request) -> Response:
    """Handle a media upload to timeline.insert, timeline.update or attachments."""
    emulator, user = authenticate(request)
    if "upload_id" in request.query_params:
        return await _resume(request, emulator, user)
    method = _upload_method(request)
    upload_type = request.query_params.get("uploadType")
    item_id = request.path_params.get("itemId") or request.path_params.get("id")

    if upload_type == "resumable":
        return await _open_session(request, emulator, user, method, item_id)
    if upload_type == "multipart":
        metadata, media_type, writer = await _receive_multipart(request, emulator)
    elif upload_type == "media":
        metadata = {}
        media_type = uploads.media_type_of(request.headers.get("content-type"))
        writer = await _receive_media(request, emulator)
    else:
        raise bad_request(
            f"uploadType has value {upload_type!r}; expected 'media', 'multipart' "
            "or 'resumable'.",
            field="uploadType",
        )

    received = Upload(method, item_id, metadata, media_type, writer)

    return _complete(request, emulator, user, received)


async def _receive_multipart(
    request: Request, emulator: Emulator
) -> tuple[dict[str, Any], str, BlobWriter]:
    limit = emulator.config.max_upload_bytes
    body = await uploads.read_body(request, limit + _MAX_JSON_BYTES)
    parts = uploads.split_multipart(request.headers.get("content-type", ""), body)
    metadata, media_type, content = uploads.metadata_and_media(parts)
    if content.nbytes > limit:
        raise uploads.too_large(limit)

    writer = emulator.blob_writer()
    uploads.copy_into(writer, content)

    return metadata, media_type, writer


async def _receive_media(request: Request, emulator: Emulator) -> BlobWriter:
    writer = emulator.blob_writer()
    try:
        await uploads.stream_body(request, writer, emulator.config.max_upload_bytes)
    except BaseException:
        writer.abort()
        raise

    return writer


def _upload_method(request: Request) -> str:
    if "itemId" in request.path_params:
        expected, method = "POST", "timeline.attachments.insert"
    elif "id" in request.path_params:
        expected, method = "PUT", "timeline.update"
    else:
        expected, method = "POST", "timeline.insert"
    if request.method != expected:
        raise ApiError(
            405,
            f"{method} uploads with {expected}, not {request.method}.",
            reason="httpMethodNotAllowed",
        )

    return method


def _complete(
    request: Request, emulator: Emulator, user: User, upload: Upload
) -> Response:
    """Make the call a finished upload was for, with its content."""
    blob = upload.writer.finish()
    item_id = upload.item_id or ""
    try:
        if upload.method == "timeline.attachments.insert":
            item = emulator.live_item(user, item_id)
            attachment = emulator.add_attachment(user, item, upload.content_type, blob)
            return json_response(attachment.to_json(base_url(request)))
        if upload.method == "timeline.update":
            item = emulator.update_item(user, item_id, upload.metadata)
            for replaced in item.attachments:
                replaced.blob.discard()
            item.attachments = []
        else:
            item = emulator.insert_item(user, upload.metadata)
        emulator.add_attachment(user, item, upload.content_type, blob)
    except BaseException:
        blob.discard()
        raise

    return item_response(request, item)


async def _open_session(
    request: Request,
    emulator: Emulator,
    user: User,
    method: str,
    item_id: str | None,
) -> Response:
    metadata = await read_json_body(request)
    media_type = uploads.media_type_of(request.headers.get("x-upload-content-type"))
    length = request.headers.get("x-upload-content-length")
    total = int(length) if length and length.isdigit() else None
    limit = emulator.config.max_upload_bytes
    if total is not None and total > limit:
        raise uploads.too_large(limit)
    if method != "timeline.insert":
        emulator.live_item(user, item_id or "")

    session_id = new_secret()
    emulator.uploads[session_id] = Upload(
        method,
        item_id,
        metadata,
        media_type,
        emulator.blob_writer(),
        user_id=user.id,
        total=total,
    )
    location = base_url(request) + request.url.path.lstrip("/")

    return Response(
        status_code=200,
        headers={"Location": f"{location}?uploadType=resumable&upload_id={session_id}"},
    )


async def _resume(request: Request, emulator: Emulator, user: User) -> Response:
    session_id = request.query_params["upload_id"]
    session = emulator.uploads.get(session_id)
    if session is None or session.user_id != user.id:
        raise ApiError(
            404,
            f"Upload session {session_id!r} does not exist or has ended.",
            reason="notFound",
        )
    chunk = uploads.parse_content_range(request.headers.get("content-range"))
    writer = session.writer
    if chunk is not None and chunk.total is not None:
        session.total = chunk.total
    if chunk is not None and chunk.start is not None and chunk.start != writer.size:
        raise bad_request(
            f"The chunk starts at byte {chunk.start}, but {writer.size} bytes "
            "were received so far; resume from there.",
        )

    limit = emulator.config.max_upload_bytes
    try:
        await uploads.stream_body(request, writer, limit)
    except BaseException:
        del emulator.uploads[session_id]
        writer.abort()
        raise
    finished = chunk is None or (
        session.total is not None and writer.size >= session.total
    )
    if not finished:
        headers = {"Range": f"bytes=0-{writer.size - 1}"} if writer.size else {}
        return Response(status_code=308, headers=headers)

    del emulator.uploads[session_id]
    return _complete(request, emulator, user, session)


# Subscriptions


async def subscriptions_insert(request: Request) -> Response:
    """Handle subscriptions.insert."""
    emulator, user = authenticate(request)
    body = await read_json_body(request)

    return json_response(emulator.insert_subscription(user, body).to_json())


async def subscriptions_list(request: Request) -> Response:
    """Handle subscriptions.list."""
    _, user = authenticate(request)
    items = [s.to_json() for s in user.subscriptions.values()]

    return json_response({"kind": "mirror#subscriptionsList", "items": items})


async def subscriptions_update(request: Request) -> Response:
    """Handle subscriptions.update."""
    emulator, user = authenticate(request)
    body = await read_json_body(request)
    subscription_id = request.path_params["id"]

    return json_response(
        emulator.update_subscription(user, subscription_id, body).to_json()
    )


async def subscriptions_delete(request: Request) -> Response:
    """Handle subscriptions.delete."""
    emulator, user = authenticate(request)
    emulator.delete_subscription(user, request.path_params["id"])

    return Response(status_code=204)


# Locations


async def locations_get(request: Request) -> Response:
    """Handle locations.get; ``latest`` is the newest fix."""
    emulator, user = authenticate(request)

    return json_response(emulator.location(user, request.path_params["id"]).to_json())


async def locations_list(request: Request) -> Response:
    """Handle locations.list, newest fix first."""
    _, user = authenticate(request)
    newest_first = sorted(user.locations, key=lambda loc: loc.timestamp, reverse=True)

    return json_response(
        {
            "kind": "mirror#locationsList",
            "items": [location.to_json() for location in newest_first],
        }
    )


# OAuth


async def token(request: Request) -> Response:
    """Exchange a refresh token for an access token, as Google's endpoint did."""
    emulator = emulator_of(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError(
            400,
            "invalid_request",
            f"Content-Type {content_type!r} is not accepted; send the parameters "
            "as application/x-www-form-urlencoded.",
        )
    body = await uploads.read_body(request, _MAX_JSON_BYTES)
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    request.scope["emulator.user_id"] = emulator.refresh_token_owner(
        form.get("refresh_token")
    )

    return json_response(emulator.grant(form), headers={"Cache-Control": "no-store"})


def routes() -> list[BaseRoute]:
    """Return the routes of the Mirror API, media, content and token endpoints."""
    api = "/mirror/v1"
    upload_routes: list[BaseRoute] = []
    for prefix in ("/upload/mirror/v1", "/resumable/upload/mirror/v1"):
        upload_routes += [
            Route(prefix + "/timeline", upload, methods=["POST", "PUT"]),
            Route(prefix + "/timeline/{id}", upload, methods=["POST", "PUT"]),
            Route(
                prefix + "/timeline/{itemId}/attachments",
                upload,
                methods=["POST", "PUT"],
            ),
        ]

    return [
        Route(f"{api}/timeline", timeline_insert, methods=["POST"]),
        Route(f"{api}/timeline", timeline_list, methods=["GET"]),
        Route(f"{api}/timeline/{{id}}", timeline_get, methods=["GET"]),
        Route(f"{api}/timeline/{{id}}", timeline_update, methods=["PUT"]),
        Route(f"{api}/timeline/{{id}}", timeline_patch, methods=["PATCH"]),
        Route(f"{api}/timeline/{{id}}", timeline_delete, methods=["DELETE"]),
        Route(
            f"{api}/timeline/{{itemId}}/attachments", attachments_list, methods=["GET"]
        ),
        Route(
            f"{api}/timeline/{{itemId}}/attachments",
            attachments_insert_without_media,
            methods=["POST"],
        ),
        Route(
            f"{api}/timeline/{{itemId}}/attachments/{{attachmentId}}",
            attachments_get,
            methods=["GET"],
        ),
        Route(
            f"{api}/timeline/{{itemId}}/attachments/{{attachmentId}}",
            attachments_delete,
            methods=["DELETE"],
        ),
        Route(f"{api}/subscriptions", subscriptions_insert, methods=["POST"]),
        Route(f"{api}/subscriptions", subscriptions_list, methods=["GET"]),
        Route(f"{api}/subscriptions/{{id}}", subscriptions_update, methods=["PUT"]),
        Route(f"{api}/subscriptions/{{id}}", subscriptions_delete, methods=["DELETE"]),
        Route(f"{api}/locations", locations_list, methods=["GET"]),
        Route(f"{api}/locations/{{id}}", locations_get, methods=["GET"]),
        *upload_routes,
        Route(
            "/content/timeline/{itemId}/attachments/{attachmentId}",
            content_download,
            methods=["GET"],
        ),
        Route("/oauth2/v4/token", token, methods=["POST"]),
    ]
