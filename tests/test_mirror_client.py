"""mirrorflow's Mirror client: one attempt per call, clear failures, streaming."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import google.auth.exceptions
import pytest
import requests
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import Resource

from activities import mirror
from emulator.content import generated_sha256
from emulator.testing import EmulatorAdmin, EmulatorUser


@pytest.fixture
def credentials(mirror_user: EmulatorUser) -> Credentials:
    """Return the test user's credentials."""
    return mirror.credentials_from_info(mirror_user.credentials)


@pytest.fixture
def service(emulator: EmulatorAdmin, credentials: Credentials) -> Iterator[Resource]:
    """Return a Mirror client of the test user."""
    with mirror.build_mirror(
        credentials, root_url=emulator.root_url, timeout=5
    ) as built:
        yield built


@pytest.fixture
def item_id(service: Resource) -> str:
    """Return the id of a fresh timeline item of the test user."""
    item_id: str = service.timeline().insert(body={"text": "x"}).execute()["id"]

    return item_id


@pytest.fixture
def closed_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]

    return port


def read(credentials: Credentials, url: str) -> int:
    """Read the content at ``url`` to its end; return its length."""
    with mirror.open_content(credentials, url, timeout=5) as content:
        return sum(len(chunk) for chunk in content)


def calls_to(emulator: EmulatorAdmin, mark: int, path: str) -> int:
    """Return how many recorded requests since ``mark`` went to ``path``."""
    return sum(1 for r in emulator.requests(after=mark) if r["path"] == path)


# Credentials and building


def test_credentials_from_info_refresh_at_their_token_uri(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    credentials = mirror.credentials_from_info(mirror_user.credentials)
    mark = emulator.mark()

    with mirror.build_mirror(credentials, root_url=emulator.root_url) as service:
        service.timeline().list().execute()

    assert credentials.token_uri == emulator.url + "/oauth2/v4/token"
    assert credentials.valid
    assert calls_to(emulator, mark, "/oauth2/v4/token") == 1


def test_credentials_from_info_keep_a_saved_token(
    emulator: EmulatorAdmin, credentials: Credentials, item_id: str
) -> None:
    saved = json.loads(credentials.to_json())  # type: ignore[no-untyped-call]
    mark = emulator.mark()

    restored = mirror.credentials_from_info(saved)
    with mirror.build_mirror(restored, root_url=emulator.root_url) as service:
        service.timeline().get(id=item_id).execute()

    assert restored.token == credentials.token
    assert calls_to(emulator, mark, "/oauth2/v4/token") == 0


def test_credentials_from_info_name_the_missing_fields() -> None:
    with pytest.raises(ValueError, match="client_secret, refresh_token"):
        mirror.credentials_from_info({"client_id": "id"})


def test_discovery_document_is_parsed_once(
    emulator: EmulatorAdmin, credentials: Credentials
) -> None:
    first = mirror.discovery_document()

    for _ in range(3):
        mirror.build_mirror(credentials, root_url=emulator.root_url).close()

    assert mirror.discovery_document() is first
    assert mirror.discovery_document.cache_info().misses == 1


def test_build_mirror_calls_the_root_url_given(
    emulator: EmulatorAdmin, service: Resource, item_id: str
) -> None:
    mark = emulator.mark()

    service.timeline().get(id=item_id).execute()

    assert calls_to(emulator, mark, f"/mirror/v1/timeline/{item_id}") == 1


def test_build_mirror_serves_many_threads_at_once(
    emulator: EmulatorAdmin, credentials: Credentials, item_id: str
) -> None:
    """Activities run on a thread pool and share the cached document."""

    def fetch(_: int) -> str:
        with mirror.build_mirror(credentials, root_url=emulator.root_url) as service:
            fetched: str = service.timeline().get(id=item_id).execute()["id"]
            return fetched

    with ThreadPoolExecutor(max_workers=8) as pool:
        fetched = list(pool.map(fetch, range(32)))

    assert fetched == [item_id] * 32


# One attempt per call, and what a failure raises


def test_dropped_connection_is_not_retried(
    emulator: EmulatorAdmin, service: Resource, item_id: str
) -> None:
    """httplib2 alone would send the request again on a fresh connection."""
    path = f"/mirror/v1/timeline/{item_id}"
    emulator.add_fault(f"^{path}$", drop=True, times=1)
    mark = emulator.mark()

    with pytest.raises(http.client.RemoteDisconnected) as raised:
        service.timeline().get(id=item_id).execute()

    assert mirror.classify(raised.value) is mirror.Failure.RETRYABLE
    assert calls_to(emulator, mark, path) == 1
    assert service.timeline().get(id=item_id).execute()["id"] == item_id


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        pytest.param(400, mirror.Failure.CLIENT_ERROR, id="400"),
        pytest.param(403, mirror.Failure.CLIENT_ERROR, id="403"),
        pytest.param(404, mirror.Failure.GONE, id="404"),
        pytest.param(410, mirror.Failure.GONE, id="410"),
        pytest.param(429, mirror.Failure.RETRYABLE, id="429"),
        pytest.param(500, mirror.Failure.RETRYABLE, id="500"),
        pytest.param(503, mirror.Failure.RETRYABLE, id="503"),
    ],
)
def test_error_status_raises_http_error_once(
    emulator: EmulatorAdmin,
    service: Resource,
    item_id: str,
    status: int,
    failure: mirror.Failure,
) -> None:
    path = f"/mirror/v1/timeline/{item_id}"
    emulator.add_fault(f"^{path}$", status=status)
    mark = emulator.mark()

    with pytest.raises(mirror.HttpError) as raised:
        service.timeline().get(id=item_id).execute()

    assert mirror.status_of(raised.value) == status
    assert mirror.classify(raised.value) == failure
    assert calls_to(emulator, mark, path) == 1


@pytest.mark.parametrize(
    ("reason", "failure"),
    [
        pytest.param("rateLimitExceeded", mirror.Failure.RETRYABLE, id="rate-limit"),
        pytest.param("userRateLimitExceeded", mirror.Failure.RETRYABLE, id="user-rate"),
        pytest.param(
            "insufficientPermissions", mirror.Failure.CLIENT_ERROR, id="scope"
        ),
    ],
)
def test_403_is_retryable_only_for_rate_limits(
    emulator: EmulatorAdmin,
    service: Resource,
    item_id: str,
    reason: str,
    failure: mirror.Failure,
) -> None:
    """Google's APIs answered some rate limits with 403, not 429."""
    emulator.add_fault(f"^/mirror/v1/timeline/{item_id}$", status=403, reason=reason)

    with pytest.raises(mirror.HttpError) as raised:
        service.timeline().get(id=item_id).execute()

    assert mirror.classify(raised.value) == failure


def test_401_after_refreshing_raises_http_error(
    emulator: EmulatorAdmin, service: Resource, item_id: str
) -> None:
    path = f"/mirror/v1/timeline/{item_id}"
    emulator.add_fault(f"^{path}$", status=401)
    mark = emulator.mark()

    with pytest.raises(mirror.HttpError) as raised:
        service.timeline().get(id=item_id).execute()

    assert mirror.status_of(raised.value) == 401
    assert mirror.classify(raised.value) is mirror.Failure.RETRYABLE
    assert calls_to(emulator, mark, "/oauth2/v4/token") == 2
    assert calls_to(emulator, mark, path) == 3


def test_revoked_grant_raises_invalid_grant(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    service: Resource,
    item_id: str,
) -> None:
    emulator.revoke(mirror_user)

    with pytest.raises(google.auth.exceptions.RefreshError) as raised:
        service.timeline().get(id=item_id).execute()

    assert mirror.is_invalid_grant(raised.value)
    assert mirror.classify(raised.value) is mirror.Failure.REVOKED


def test_token_endpoint_5xx_fails_the_refresh_at_once(
    emulator: EmulatorAdmin, credentials: Credentials
) -> None:
    """google-auth alone would ask the token endpoint up to three times."""
    emulator.add_fault("^/oauth2/v4/token$", status=503)
    mark = emulator.mark()

    with (
        mirror.build_mirror(credentials, root_url=emulator.root_url) as service,
        pytest.raises(google.auth.exceptions.RefreshError) as raised,
    ):
        service.timeline().list().execute()

    assert not mirror.is_invalid_grant(raised.value)
    assert mirror.classify(raised.value) is mirror.Failure.RETRYABLE
    assert calls_to(emulator, mark, "/oauth2/v4/token") == 1


def test_unknown_client_is_a_client_error(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    credentials = mirror.credentials_from_info(
        {**mirror_user.credentials, "client_secret": "wrong"}
    )

    with (
        mirror.build_mirror(credentials, root_url=emulator.root_url) as service,
        pytest.raises(google.auth.exceptions.RefreshError) as raised,
    ):
        service.timeline().list().execute()

    assert mirror.classify(raised.value) is mirror.Failure.CLIENT_ERROR


def test_slow_answer_raises_timeout_error(
    emulator: EmulatorAdmin, credentials: Credentials, item_id: str
) -> None:
    emulator.add_fault(f"^/mirror/v1/timeline/{item_id}$", latency=2.0, times=1)

    started = time.monotonic()
    with (
        mirror.build_mirror(
            credentials, root_url=emulator.root_url, timeout=0.3
        ) as service,
        pytest.raises(TimeoutError) as raised,
    ):
        service.timeline().get(id=item_id).execute()

    assert time.monotonic() - started < 1.5
    assert mirror.classify(raised.value) is mirror.Failure.RETRYABLE


def test_refused_connection_to_the_api_raises_connection_error(
    credentials: Credentials, closed_port: int
) -> None:
    root = f"http://127.0.0.1:{closed_port}/"

    with (
        mirror.build_mirror(credentials, root_url=root) as service,
        pytest.raises(ConnectionRefusedError) as raised,
    ):
        service.timeline().list().execute()

    assert mirror.classify(raised.value) is mirror.Failure.RETRYABLE


def test_refused_connection_to_the_token_endpoint_is_retryable(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, closed_port: int
) -> None:
    info = {
        **mirror_user.credentials,
        "token_uri": f"http://127.0.0.1:{closed_port}/token",
    }
    credentials = mirror.credentials_from_info(info)

    with (
        mirror.build_mirror(credentials, root_url=emulator.root_url) as service,
        pytest.raises(ConnectionRefusedError) as raised,
    ):
        service.timeline().list().execute()

    assert mirror.classify(raised.value) is mirror.Failure.RETRYABLE


def test_classify_leaves_unrelated_errors_alone() -> None:
    assert mirror.classify(ValueError("a bug")) is None
    assert mirror.classify(KeyError("id")) is None


# Content


def test_open_content_streams_in_bounded_chunks(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, credentials: Credentials
) -> None:
    size = 3 * 1024 * 1024 + 5
    _, attachment = emulator.add_item_with_attachment(
        mirror_user, content_type="video/mp4", generated_size=size, seed="chunks"
    )

    digest, sizes = hashlib.sha256(), []
    with mirror.open_content(
        credentials, attachment["contentUrl"], timeout=5, chunk_size=64 * 1024
    ) as content:
        for chunk in content:
            digest.update(chunk)
            sizes.append(len(chunk))

    assert (content.status, content.size, content.content_type) == (
        200,
        size,
        "video/mp4",
    )
    assert max(sizes) <= 64 * 1024
    assert sum(sizes) == size
    assert digest.hexdigest() == generated_sha256(size, "chunks")


def test_open_content_sends_extra_headers(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, credentials: Credentials
) -> None:
    _, attachment = emulator.add_item_with_attachment(mirror_user, b"0123456789")

    with mirror.open_content(
        credentials, attachment["contentUrl"], timeout=5, headers={"Range": "bytes=2-4"}
    ) as content:
        body = b"".join(content)

    assert (content.status, body) == (206, b"234")


def test_open_content_raises_http_error_for_a_missing_attachment(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, credentials: Credentials
) -> None:
    item, attachment = emulator.add_item_with_attachment(mirror_user, b"gone soon")
    emulator.act(mirror_user, item["id"], "DELETE")

    with (
        pytest.raises(mirror.HttpError) as raised,
        mirror.open_content(credentials, attachment["contentUrl"], timeout=5),
    ):
        pass

    assert mirror.status_of(raised.value) == 404
    assert mirror.classify(raised.value) is mirror.Failure.GONE
    assert "was not found" in raised.value.reason


def test_open_content_refreshes_an_expired_token(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, credentials: Credentials
) -> None:
    _, attachment = emulator.add_item_with_attachment(mirror_user, b"fresh")
    assert read(credentials, attachment["contentUrl"]) == 5
    emulator.expire_tokens(mirror_user)
    mark = emulator.mark()

    size = read(credentials, attachment["contentUrl"])

    assert size == 5
    assert calls_to(emulator, mark, "/oauth2/v4/token") == 1


def test_open_content_cut_mid_body_raises_a_retryable_error(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, credentials: Credentials
) -> None:
    _, attachment = emulator.add_item_with_attachment(
        mirror_user, content_type="video/mp4", generated_size=2 * 1024 * 1024
    )
    emulator.add_fault("^/content/", drop_after_bytes=100_000, times=1)

    with pytest.raises(requests.RequestException) as raised:
        read(credentials, attachment["contentUrl"])

    assert mirror.classify(raised.value) is mirror.Failure.RETRYABLE
