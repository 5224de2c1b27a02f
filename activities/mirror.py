"""Call the Mirror API as one user: credentials, the client, content download.

The client is google-api-python-client built from mirrorflow's own discovery
document (``mirror_v1.json`` beside this module, parsed once per process)
with the root URL of the Mirror endpoint in use: Google's, or the
emulator's. Content is streamed from an attachment's ``contentUrl`` with
:func:`open_content`, never held whole.

Temporal owns retries, so nothing here retries on its own: each call makes
one HTTP attempt (see :class:`OneAttemptHttp`) and the client library's
``num_retries`` stays 0. Refreshing an expired or rejected access token is
authentication, not a retry, and still happens: before a call when the
token has expired, and once more after a ``401``.

What a failed call raises, and what :func:`classify` makes of it::

    HttpError (googleapiclient.errors)    any non-2xx answer, from the API or
                                          from open_content; status_of() reads
                                          its status
      404, 410                            -> "gone"
      401 (after a refresh)               -> "retryable": the next attempt's
                                             refresh tells a revoked grant apart
      403 rate or quota limits, 408, 429, 5xx -> "retryable"
      other 4xx                           -> "client_error"
    google.auth.exceptions.RefreshError   the token endpoint said no
      invalid_grant (revoked, expired)    -> "revoked"
      5xx, 429 from the token endpoint    -> "retryable" (exc.retryable is True)
      others (invalid_client, ...)        -> "client_error"
    google.auth.exceptions.TransportError the token request failed in transit
                                          -> "retryable"
    TimeoutError (socket.timeout)         no answer within ``timeout`` -> "retryable"
    ConnectionError (refused, reset, the server closed without answering:
      http.client.RemoteDisconnected)     -> "retryable"
    http.client.HTTPException             a broken or cut answer -> "retryable"
    requests.RequestException             open_content's transport failures
      Timeout, ConnectionError, ChunkedEncodingError (cut mid-body)
                                          -> "retryable"; others -> "client_error"

Exceptions that are none of these (programming errors) classify as None.
"""

from __future__ import annotations

import functools
import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from importlib.resources import files
from typing import Any

import google.auth.exceptions
import google.auth.transport
import google_auth_httplib2
import httplib2  # type: ignore[import-untyped]
import requests
from google.auth.transport.requests import AuthorizedSession
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import Resource, build_from_document
from googleapiclient.errors import HttpError

__all__ = [
    "GOOGLE_ROOT_URL",
    "GOOGLE_TOKEN_URI",
    "SCOPES",
    "Content",
    "Failure",
    "HttpError",
    "OneAttemptHttp",
    "build_mirror",
    "classify",
    "credentials_from_info",
    "discovery_document",
    "is_invalid_grant",
    "open_content",
    "status_of",
]

GOOGLE_ROOT_URL = "https://www.googleapis.com/"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)

SCOPES = (
    "https://www.googleapis.com/auth/glass.timeline",
    "https://www.googleapis.com/auth/glass.location",
)

DEFAULT_CHUNK_SIZE = 1024 * 1024

_RATE_LIMIT_REASONS = frozenset(
    {"rateLimitExceeded", "userRateLimitExceeded", "backendError"}
)


class Failure(StrEnum):
    """What a failed Mirror call means for the activity that made it."""

    GONE = "gone"
    """The item, attachment or location does not exist (any more)."""
    REVOKED = "revoked"
    """The user's grant is revoked or expired: nothing works until they re-grant."""
    RETRYABLE = "retryable"
    """A transient failure: timeouts, dropped connections, 5xx, rate limits."""
    CLIENT_ERROR = "client_error"
    """Mirror refused the request as made; repeating it cannot help."""


class _OneAttemptCredentials(Credentials):
    """User credentials whose refresh asks the token endpoint exactly once.

    google-auth repeats a token request itself when the endpoint answers
    5xx or 429; here such an answer fails the refresh at once, as a
    retryable ``RefreshError``, and Temporal decides about retrying.
    """

    def refresh(self, request: google.auth.transport.Request) -> None:
        """Refresh the access token, failing fast on a transient answer."""
        super().refresh(_FailFast(request))  # type: ignore[no-untyped-call]


class _FailFast:
    """A transport wrapper that raises on the answers google-auth would retry."""

    def __init__(self, request: google.auth.transport.Request) -> None:
        self._request = request

    def __call__(self, *args: Any, **kwargs: Any) -> google.auth.transport.Response:
        response: google.auth.transport.Response = self._request(*args, **kwargs)
        if response.status in google.auth.transport.DEFAULT_RETRYABLE_STATUS_CODES:
            raise google.auth.exceptions.RefreshError(  # type: ignore[no-untyped-call]
                f"The token endpoint answered {response.status}; try again later.",
                retryable=True,
            )

        return response


def credentials_from_info(info: Mapping[str, Any]) -> Credentials:
    """Return a user's credentials from Google's ``authorized_user`` JSON.

    Unlike google-auth's own loader, which always refreshes at Google's
    token endpoint, these refresh at the ``token_uri`` the JSON carries (the
    emulator's, for emulator users; Google's when absent). They never repeat
    a token request. A saved access token is reused only with its expiry.

    Raises:
        ValueError: a required field (client_id, client_secret,
            refresh_token) is missing, or the expiry is not a time.
    """
    missing = sorted({"client_id", "client_secret", "refresh_token"} - set(info))
    if missing:
        raise ValueError(
            f"The credentials lack {', '.join(missing)}; expected Google's "
            "authorized_user JSON (client_id, client_secret, refresh_token, "
            "token_uri)."
        )
    expiry = _parse_expiry(info.get("expiry"))
    scopes = info.get("scopes")

    return _OneAttemptCredentials(  # type: ignore[no-untyped-call]
        token=info.get("token") if expiry is not None else None,
        refresh_token=info["refresh_token"],
        token_uri=info.get("token_uri") or GOOGLE_TOKEN_URI,
        client_id=info["client_id"],
        client_secret=info["client_secret"],
        scopes=scopes.split() if isinstance(scopes, str) else scopes,
        expiry=expiry,
        quota_project_id=info.get("quota_project_id"),
    )


def _parse_expiry(value: Any) -> datetime | None:
    """Return an expiry as google-auth keeps it: naive, in UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(
            f"The credentials' expiry {value!r} is not an ISO 8601 time."
        ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)

    return moment


@functools.cache
def discovery_document() -> dict[str, Any]:
    """Return mirrorflow's Mirror v1 discovery document, parsed once per process.

    The client library adds its own parameters to a document's method
    descriptions the first time it builds each method. Building every
    method once here, before anyone else sees the document, leaves later
    builds (from many threads) only rewriting what is already there.
    """
    text = files("activities").joinpath("mirror_v1.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)

    with build_from_document(document, http=httplib2.Http()) as service:
        _visit(service, document.get("resources", {}))

    return document


def _visit(resource: Any, resources: Mapping[str, Any]) -> None:
    for name, description in resources.items():
        child = getattr(resource, name)()
        _visit(child, description.get("resources", {}))


class OneAttemptHttp(httplib2.Http):  # type: ignore[misc]
    """An ``httplib2.Http`` that makes one attempt per request, on a fresh connection.

    httplib2 sends a request again, on its own, when the connection fails
    before an answer arrives (its ``RETRIES`` setting and a "stale
    connection" rule that ignores it). This class connects for every
    request, closes the connection once the answer is read, and lets any
    failure out as it happened, so that each Temporal attempt is one HTTP
    attempt. Compression is turned off so that answers need no decoding.
    """

    def __init__(self, *, timeout: float) -> None:
        super().__init__(timeout=timeout)
        # Google's resumable uploads answer 308 for "incomplete", not to redirect.
        self.redirect_codes: frozenset[int] = httplib2.REDIRECT_CODES - {308}

    def _conn_request(
        self,
        conn: http.client.HTTPConnection,
        request_uri: str,
        method: str,
        body: Any,
        headers: dict[str, str],
    ) -> tuple[httplib2.Response, bytes]:
        headers = {**headers, "accept-encoding": "identity", "connection": "close"}
        try:
            if conn.sock is None:
                conn.connect()
            conn.request(method, request_uri, body, headers)
            answer = conn.getresponse()
            content = b"" if method == "HEAD" else answer.read()
        finally:
            conn.close()

        return httplib2.Response(answer), content


def build_mirror(
    credentials: Credentials,
    *,
    root_url: str = GOOGLE_ROOT_URL,
    timeout: float = 30.0,
) -> Resource:
    """Return a Mirror v1 client that calls ``root_url`` as the credentials' user.

    Use it as a context manager, or call ``close()``, when done; each
    request uses its own connection, so nothing stays open meanwhile.

    Args:
        credentials: the user's OAuth credentials; refreshed when needed.
        root_url: the API's root, such as ``https://www.googleapis.com/`` or
            the emulator's ``http://127.0.0.1:8090/``.
        timeout: seconds to wait for a connection, and then for each read.
    """
    root = root_url if root_url.endswith("/") else root_url + "/"
    document = {**discovery_document(), "rootUrl": root}
    authorized = google_auth_httplib2.AuthorizedHttp(
        credentials, http=OneAttemptHttp(timeout=timeout)
    )

    service: Resource = build_from_document(document, http=authorized)
    return service


@functools.cache
def shared_resource(root_url: str, *path: str) -> Resource:
    """Return one Mirror v1 resource, such as ``("timeline", "attachments")``.

    Built once per process and shared by every thread: the client library
    rebuilds a resource's methods and their docstrings each time one is
    reached from a client (about a millisecond per activity). The resource
    holds no credentials; send each request as a user with
    ``request.execute(http=user_http(credentials))``, as the library's
    thread-safety guide recommends.
    """
    root = root_url if root_url.endswith("/") else root_url + "/"
    document = {**discovery_document(), "rootUrl": root}
    resource: Resource = build_from_document(document, http=httplib2.Http())
    for name in path:
        resource = getattr(resource, name)()

    return resource


def user_http(
    credentials: Credentials, *, timeout: float = 30.0
) -> google_auth_httplib2.AuthorizedHttp:
    """Return an HTTP client that sends requests as the credentials' user.

    Like :func:`build_mirror`'s: one attempt per request on a fresh
    connection; close it when done.
    """
    return google_auth_httplib2.AuthorizedHttp(
        credentials, http=OneAttemptHttp(timeout=timeout)
    )


class Content:
    """An attachment's content as it streams in, with the answer's metadata."""

    def __init__(self, response: requests.Response, chunk_size: int) -> None:
        self._response = response
        self._chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"Content(status={self.status}, size={self.size})"

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks()

    @property
    def status(self) -> int:
        """Return the HTTP status of the answer (200, or 206 for a range)."""
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        """Return the answer's headers."""
        return self._response.headers

    @property
    def content_type(self) -> str | None:
        """Return the content's MIME type, if the answer gave one."""
        return self._response.headers.get("content-type")

    @property
    def size(self) -> int | None:
        """Return the content's length in bytes, if the answer gave it."""
        length = self._response.headers.get("content-length")

        return int(length) if length is not None and length.isdigit() else None

    def chunks(self) -> Iterator[bytes]:
        """Yield the content in pieces of at most the chunk size, as they arrive.

        Raises:
            requests.RequestException: the connection failed or was cut
                before the whole content arrived.
        """
        yield from self._response.iter_content(chunk_size=self._chunk_size)


@contextmanager
def open_content(
    credentials: Credentials,
    url: str,
    *,
    timeout: float = 30.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    headers: Mapping[str, str] | None = None,
) -> Iterator[Content]:
    """Open an attachment's ``contentUrl`` as the credentials' user, streaming.

    Nothing is read before the caller iterates; the connection closes when
    the block ends.

    Args:
        credentials: the user's OAuth credentials; refreshed when needed.
        url: the attachment's ``contentUrl``.
        timeout: seconds to wait for the connection and then for each read.
        chunk_size: the most bytes one chunk holds.
        headers: extra request headers, such as ``Range``.

    Raises:
        HttpError: the answer is not a success; ``status_of`` reads its status.
        requests.RequestException: the request failed in transit.
        google.auth.exceptions.RefreshError: the token could not be refreshed.
    """
    session = AuthorizedSession(  # type: ignore[no-untyped-call]
        credentials, refresh_timeout=timeout
    )
    with session:
        # Mirror's content comes from the Mirror endpoint only: no proxies
        # or .netrc credentials from the environment.
        session.trust_env = False
        response = session.get(
            url, stream=True, timeout=timeout, headers=dict(headers or {})
        )
        with response:
            if response.status_code >= 300:
                raise _http_error(response, url)
            yield Content(response, chunk_size)


def _http_error(response: requests.Response, url: str) -> HttpError:
    """Return the ``HttpError`` the client library would raise for this answer."""
    info = {k.lower(): v for k, v in response.headers.items()}
    info["status"] = str(response.status_code)
    answer = httplib2.Response(info)
    answer.reason = response.reason or ""

    # An error body is small; read no more than its first 64 KiB regardless.
    body = next(response.iter_content(64 * 1024), b"")

    return HttpError(answer, body, uri=url)


def status_of(exc: BaseException) -> int | None:
    """Return the HTTP status an exception reports, if it reports one."""
    if isinstance(exc, HttpError):
        return int(exc.resp.status)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code

    return None


def is_invalid_grant(exc: BaseException) -> bool:
    """Tell whether the token endpoint refused the user's grant (``invalid_grant``).

    Google answers ``invalid_grant`` when the user revoked mirrorflow's
    access or the refresh token expired; no retry can fix either.
    """
    if not isinstance(exc, google.auth.exceptions.RefreshError):
        return False
    for arg in exc.args:
        if isinstance(arg, Mapping) and arg.get("error") == "invalid_grant":
            return True

    return bool(exc.args) and str(exc.args[0]).startswith("invalid_grant")


def classify(exc: BaseException) -> Failure | None:
    """Return what a failed Mirror call means, or None for unrelated errors."""
    status = status_of(exc)
    if status is not None:
        return _classify_status(status, exc)
    if isinstance(exc, google.auth.exceptions.RefreshError):
        if is_invalid_grant(exc):
            return Failure.REVOKED
        retryable = getattr(exc, "retryable", False)
        return Failure.RETRYABLE if retryable else Failure.CLIENT_ERROR
    if isinstance(exc, requests.RequestException):
        transient = (
            requests.Timeout,
            requests.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
        )
        return Failure.RETRYABLE if isinstance(exc, transient) else Failure.CLIENT_ERROR
    transient_errors = (
        google.auth.exceptions.TransportError,
        http.client.HTTPException,
        httplib2.HttpLib2Error,
        socket.timeout,
        OSError,
    )
    if isinstance(exc, transient_errors):
        return Failure.RETRYABLE

    return None


def _classify_status(status: int, exc: BaseException) -> Failure:
    if status in (404, 410):
        return Failure.GONE
    if status in (401, 408, 429) or status >= 500:
        return Failure.RETRYABLE
    if status == 403 and _reason(exc) in _RATE_LIMIT_REASONS:
        return Failure.RETRYABLE

    return Failure.CLIENT_ERROR


def _reason(exc: BaseException) -> str | None:
    details = getattr(exc, "error_details", None)
    if isinstance(details, list) and details and isinstance(details[0], Mapping):
        reason = details[0].get("reason")
        return reason if isinstance(reason, str) else None

    return None
