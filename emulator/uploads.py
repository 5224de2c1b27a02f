"""Read media uploads the three ways Google's upload protocol allowed.

- ``uploadType=media``: the body is the media; it is streamed into storage.
- ``uploadType=multipart``: a ``multipart/related`` body, JSON metadata first
  and media second. The body is read whole (it is bounded by the emulator's
  ``max_upload_bytes``, Mirror's 10 MB), then the media part is copied into
  storage and the body dropped.
- ``uploadType=resumable``: a first request with the metadata opens a
  session and answers its URL in ``Location``; the media follows in one or
  more ``PUT`` requests with ``Content-Range``; ``308`` answers an incomplete
  upload with the ``Range`` received so far.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from emulator.content import BlobWriter
from emulator.errors import ApiError, bad_request
from emulator.resources import is_media_type

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"^bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)$")
_COPY_CHUNK = 1 << 20


@dataclass
class Part:
    """One part of a ``multipart/related`` body."""

    headers: dict[str, str]
    body: memoryview

    @property
    def content_type(self) -> str:
        """Return the part's media type, without parameters."""
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def too_large(limit: int) -> ApiError:
    """Return the error for media beyond the upload limit."""
    return ApiError(
        413,
        f"Media is larger than the {limit} bytes Mirror accepts in one upload.",
        reason="uploadTooLarge",
    )


def media_type_of(value: str | None) -> str:
    """Return an uploaded media type, checking that Mirror accepts it.

    Raises:
        ApiError: the type is missing or not audio, image or video.
    """
    media_type = (value or "").split(";")[0].strip()
    if not media_type:
        raise bad_request(
            "The media has no Content-Type; send the type of the audio, image "
            "or video being uploaded.",
        )
    if not is_media_type(media_type):
        raise bad_request(
            f"Media type {media_type!r} is not accepted; Mirror takes audio/*, "
            "image/* and video/*.",
        )

    return media_type


async def stream_body(request: Request, writer: BlobWriter, limit: int | None) -> None:
    """Copy a request body into ``writer``, stopping past ``limit`` bytes.

    Raises:
        ApiError: 413 once the body grows beyond ``limit``.
    """
    async for chunk in request.stream():
        if limit is not None and writer.size + len(chunk) > limit:
            raise too_large(limit)
        writer.write(chunk)


async def read_body(request: Request, limit: int) -> bytearray:
    """Return a whole request body of at most ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)

    return body


def read_json(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Return the JSON object a request body holds (empty for an empty body).

    Raises:
        ApiError: the body is not a JSON object.
    """
    if not bytes(body).strip():
        return {}
    try:
        value = json.loads(bytes(body))
    except ValueError as exc:
        raise ApiError(
            400, f"The body is not valid JSON: {exc}.", reason="parseError"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(
            400,
            f"The body is a JSON {type(value).__name__}; expected an object.",
            reason="parseError",
        )

    return value


def split_multipart(content_type: str, body: bytearray) -> list[Part]:
    """Return the parts of a ``multipart/related`` body.

    Lines may end in CRLF, as the MIME standard says, or in a bare LF, as
    Python's email package writes them (google-api-python-client does).

    Raises:
        ApiError: the body is not ``multipart/related`` or is malformed.
    """
    found = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/related") or found is None:
        raise bad_request(
            f"Content-Type {content_type!r} is not usable for uploadType=multipart; "
            "expected multipart/related with a boundary.",
        )
    delimiter = b"--" + (found.group(1) or found.group(2)).encode()

    position = body.find(delimiter)
    if position < 0:
        raise bad_request("The multipart body does not contain its boundary.")
    position += len(delimiter)
    crlf = body[position : position + 2] == b"\r\n"
    view = memoryview(body)
    parts: list[Part] = []
    while body[position : position + 2] != b"--":
        position = body.find(b"\n", position) + 1
        if position == 0:
            raise bad_request("The multipart body ends inside a boundary line.")
        headers, position = _read_headers(body, position)
        end = body.find(b"\n" + delimiter, position)
        if end < 0:
            raise bad_request("The multipart body has no closing boundary.")
        stop = end - 1 if crlf and body[end - 1 : end] == b"\r" else end
        parts.append(Part(headers, view[position:stop]))
        position = end + 1 + len(delimiter)

    return parts


def _read_headers(body: bytearray, position: int) -> tuple[dict[str, str], int]:
    headers: dict[str, str] = {}
    while True:
        end = body.find(b"\n", position)
        if end < 0:
            raise bad_request("The multipart body ends inside a part's headers.")
        line = bytes(body[position:end]).rstrip(b"\r").decode("latin-1")
        position = end + 1
        if not line:
            return headers, position
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()


def metadata_and_media(parts: list[Part]) -> tuple[dict[str, Any], str, memoryview]:
    """Return the metadata, media type and media of a multipart upload.

    Raises:
        ApiError: there are not exactly two parts, JSON first.
    """
    if len(parts) != 2:
        raise bad_request(
            f"A multipart upload has {len(parts)} parts; expected 2: the JSON "
            "metadata, then the media.",
        )
    metadata, media = parts
    if metadata.content_type not in ("application/json", ""):
        raise bad_request(
            f"The first part is {metadata.content_type!r}; expected application/json.",
        )
    content = media.body
    encoding = media.headers.get("content-transfer-encoding", "binary").lower()
    if encoding == "base64":
        try:
            content = memoryview(base64.b64decode(bytes(content)))
        except binascii.Error:
            raise bad_request("The media part is not valid base64.") from None

    return read_json(metadata.body), media_type_of(media.content_type), content


def copy_into(writer: BlobWriter, content: memoryview) -> None:
    """Copy ``content`` into ``writer`` a bounded piece at a time."""
    for offset in range(0, content.nbytes, _COPY_CHUNK):
        writer.write(bytes(content[offset : offset + _COPY_CHUNK]))


@dataclass
class ContentRange:
    """A resumable upload chunk's place: bytes ``[start, end]`` of ``total``."""

    start: int | None
    end: int | None
    total: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """Return a chunk's ``Content-Range``, None when the request has none.

    Raises:
        ApiError: the header is malformed.
    """
    if value is None:
        return None
    found = _CONTENT_RANGE.match(value.strip())
    if found is None:
        raise bad_request(
            f"Content-Range {value!r} is malformed; expected 'bytes START-END/TOTAL', "
            "'bytes */TOTAL' or 'bytes START-END/*'.",
        )
    start, end, total = found.groups()

    return ContentRange(
        start=int(start) if start is not None else None,
        end=int(end) if end is not None else None,
        total=int(total) if total != "*" else None,
    )
