"""The Mirror emulator, driven over HTTP by the real Google client library."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_auth_httplib2
import httpx
import pytest
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import Resource, build_from_document
from googleapiclient.http import MediaIoBaseDownload, MediaIoBaseUpload, build_http

from activities import mirror
from emulator import EmulatorConfig, create_app
from emulator.content import generated_chunks, generated_sha256
from emulator.testing import (
    CallbackReceiver,
    EmulatorAdmin,
    EmulatorProcess,
    EmulatorUser,
)

GOOGLE_DISCOVERY = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "reference"
    / "mirror-v1-discovery.json"
)
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PHOTO = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 64


@pytest.fixture
def credentials(mirror_user: EmulatorUser) -> Credentials:
    """Return the test user's credentials."""
    return mirror.credentials_from_info(mirror_user.credentials)


@pytest.fixture
def service(emulator: EmulatorAdmin, credentials: Credentials) -> Iterator[Resource]:
    """Return a Mirror client of the test user, built by mirrorflow's client."""
    with mirror.build_mirror(
        credentials, root_url=emulator.root_url, timeout=10
    ) as built:
        yield built


def media(content: bytes, mimetype: str, **options: Any) -> MediaIoBaseUpload:
    """Return an upload of ``content`` for the client library."""
    return MediaIoBaseUpload(io.BytesIO(content), mimetype=mimetype, **options)


def download(credentials: Credentials, url: str) -> bytes:
    """Return the content at an attachment's contentUrl."""
    with mirror.open_content(credentials, url, timeout=10) as content:
        return b"".join(content.chunks())


def error_body(exc: mirror.HttpError) -> dict[str, Any]:
    """Return the JSON body of an HTTP error."""
    body: dict[str, Any] = json.loads(exc.content)

    return body


# Timeline


def test_timeline_insert_answers_server_fields(service: Resource) -> None:
    item = service.timeline().insert(body={"text": "Hello Glass"}).execute()

    assert item["kind"] == "mirror#timelineItem"
    assert item["text"] == "Hello Glass"
    assert item["selfLink"].endswith(f"/mirror/v1/timeline/{item['id']}")
    assert RFC3339.match(item["created"])
    assert RFC3339.match(item["updated"])
    assert item["etag"].startswith('"')


def test_timeline_get_answers_the_inserted_item(service: Resource) -> None:
    inserted = service.timeline().insert(body={"text": "kept", "title": "t"}).execute()

    fetched = service.timeline().get(id=inserted["id"]).execute()

    assert fetched == inserted


def test_timeline_insert_with_multipart_media_attaches_it(
    service: Resource, credentials: Credentials
) -> None:
    upload = media(PHOTO, "image/jpeg")

    item = (
        service.timeline().insert(body={"text": "photo"}, media_body=upload).execute()
    )

    (attachment,) = item["attachments"]
    assert item["text"] == "photo"
    assert attachment["contentType"] == "image/jpeg"
    assert attachment["isProcessingContent"] is False
    assert download(credentials, attachment["contentUrl"]) == PHOTO


def test_timeline_insert_with_simple_media_attaches_it(
    service: Resource, credentials: Credentials
) -> None:
    item = service.timeline().insert(media_body=media(PHOTO, "image/png")).execute()

    (attachment,) = item["attachments"]
    assert attachment["contentType"] == "image/png"
    assert download(credentials, attachment["contentUrl"]) == PHOTO


def test_timeline_insert_with_resumable_media_uploads_in_chunks(
    service: Resource, credentials: Credentials
) -> None:
    video = bytes(range(256)) * 2500
    upload = media(video, "video/mp4", resumable=True, chunksize=256 * 1024)
    request = service.timeline().insert(body={"text": "video"}, media_body=upload)

    progress, item = [], None
    while item is None:
        status, item = request.next_chunk()
        progress.append(status.progress() if status else 1.0)

    assert progress[0] < 1.0
    assert download(credentials, item["attachments"][0]["contentUrl"]) == video


def test_timeline_insert_refuses_media_that_is_not_audio_image_or_video(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    token = emulator.access_token(mirror_user)

    answer = httpx.post(
        emulator.url + "/upload/mirror/v1/timeline?uploadType=media",
        content=b"%PDF-1.4",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/pdf"},
    )

    assert answer.status_code == 400
    assert "application/pdf" in answer.json()["error"]["message"]


def test_timeline_update_with_media_replaces_the_attachments(
    service: Resource, credentials: Credentials
) -> None:
    item = service.timeline().insert(media_body=media(b"old", "image/png")).execute()

    updated = (
        service.timeline()
        .update(
            id=item["id"],
            body={"text": "retaken"},
            media_body=media(PHOTO, "image/jpeg"),
        )
        .execute()
    )

    (attachment,) = updated["attachments"]
    assert attachment["id"] != item["attachments"][0]["id"]
    assert download(credentials, attachment["contentUrl"]) == PHOTO


def test_media_beyond_the_upload_limit_is_refused(
    emulator: EmulatorAdmin, service: Resource
) -> None:
    emulator.configure(max_upload_bytes=1000)

    with pytest.raises(mirror.HttpError) as raised:
        service.timeline().insert(media_body=media(b"x" * 2000, "image/png")).execute()

    assert raised.value.status_code == 413


def test_timeline_list_pages_newest_first(service: Resource) -> None:
    inserted = [
        service.timeline().insert(body={"text": f"card {n}"}).execute()["id"]
        for n in range(5)
    ]

    pages, request = [], service.timeline().list(maxResults=2)
    while request is not None:
        answer = request.execute()
        pages.append([item["id"] for item in answer["items"]])
        request = service.timeline().list_next(request, answer)

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [item for page in pages for item in page] == inserted[::-1]


def test_timeline_list_includes_deleted_items_only_when_asked(
    service: Resource,
) -> None:
    kept = service.timeline().insert(body={"text": "kept"}).execute()
    gone = service.timeline().insert(body={"text": "gone"}).execute()
    service.timeline().delete(id=gone["id"]).execute()

    visible = service.timeline().list().execute()["items"]
    everything = service.timeline().list(includeDeleted=True).execute()["items"]

    assert [item["id"] for item in visible] == [kept["id"]]
    assert {"kind": "mirror#timelineItem", "id": gone["id"], "isDeleted": True} in (
        everything
    )


def test_timeline_update_replaces_the_fields(service: Resource) -> None:
    item = service.timeline().insert(body={"text": "old", "title": "title"}).execute()

    updated = service.timeline().update(id=item["id"], body={"text": "new"}).execute()

    assert updated["text"] == "new"
    assert "title" not in updated
    assert updated["etag"] != item["etag"]
    assert updated["created"] == item["created"]


def test_timeline_patch_changes_only_the_named_fields(service: Resource) -> None:
    item = service.timeline().insert(body={"text": "text", "title": "old"}).execute()

    patched = service.timeline().patch(id=item["id"], body={"title": "new"}).execute()

    assert (patched["text"], patched["title"]) == ("text", "new")


def test_timeline_delete_leaves_a_tombstone(service: Resource) -> None:
    item = service.timeline().insert(media_body=media(PHOTO, "image/jpeg")).execute()

    service.timeline().delete(id=item["id"]).execute()
    tombstone = service.timeline().get(id=item["id"]).execute()

    assert tombstone == {
        "kind": "mirror#timelineItem",
        "id": item["id"],
        "isDeleted": True,
    }


def test_timeline_item_with_unknown_field_is_refused(service: Resource) -> None:
    with pytest.raises(mirror.HttpError) as raised:
        service.timeline().insert(body={"txet": "typo"}).execute()

    assert raised.value.status_code == 400
    assert "'txet'" in raised.value.reason


# Attachments


def test_attachments_insert_list_get_and_delete(service: Resource) -> None:
    item = service.timeline().insert(body={"text": "album"}).execute()
    attachments = service.timeline().attachments()

    added = attachments.insert(
        itemId=item["id"], media_body=media(b"ID3 sound", "audio/mpeg")
    ).execute()
    listed = attachments.list(itemId=item["id"]).execute()
    fetched = attachments.get(itemId=item["id"], attachmentId=added["id"]).execute()
    attachments.delete(itemId=item["id"], attachmentId=added["id"]).execute()

    assert listed == {"kind": "mirror#attachmentsList", "items": [added]}
    assert fetched == added
    assert attachments.list(itemId=item["id"]).execute()["items"] == []


def test_attachment_content_is_identical_at_content_url_and_with_alt_media(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    service: Resource,
    credentials: Credentials,
) -> None:
    """Content larger than the emulator keeps in memory goes through a file."""
    content = hashlib.shake_128(b"photo").digest(3 * 1024 * 1024 + 17)
    item, attachment = emulator.add_item_with_attachment(mirror_user, content)
    request = (
        service.timeline()
        .attachments()
        .get_media(itemId=item["id"], attachmentId=attachment["id"])
    )

    buffer = io.BytesIO()
    downloader = MediaIoBaseDownload(buffer, request, chunksize=1024 * 1024)
    done = False
    while not done:
        _, done = downloader.next_chunk()

    assert buffer.getvalue() == content
    assert download(credentials, attachment["contentUrl"]) == content
    assert attachment["sha256"] == hashlib.sha256(content).hexdigest()


def test_generated_attachment_can_be_recomputed_from_its_seed(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, credentials: Credentials
) -> None:
    size = 5 * 1024 * 1024 + 3
    _, attachment = emulator.add_item_with_attachment(
        mirror_user, content_type="video/mp4", generated_size=size, seed="bench"
    )

    digest = hashlib.sha256()
    with mirror.open_content(credentials, attachment["contentUrl"], timeout=10) as got:
        for chunk in got.chunks():
            digest.update(chunk)

    assert got.size == size
    assert digest.hexdigest() == generated_sha256(size, "bench") == attachment["sha256"]
    assert (
        b"".join(generated_chunks("bench", 10, 20))
        == b"".join(generated_chunks("bench", 0, 64))[10:20]
    )


def test_attachment_stays_processing_for_the_time_asked(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, service: Resource
) -> None:
    item, attachment = emulator.add_item_with_attachment(
        mirror_user, PHOTO, content_type="video/mp4", processing_seconds=1.0
    )
    attachments = service.timeline().attachments()
    ids = {"itemId": item["id"], "attachmentId": attachment["id"]}

    processing = attachments.get(**ids).execute()
    with pytest.raises(mirror.HttpError) as refused:
        attachments.get_media(**ids).execute()
    time.sleep(1.05)
    ready = attachments.get(**ids).execute()

    assert processing["isProcessingContent"] is True
    assert "contentUrl" not in processing
    assert refused.value.status_code == 503
    assert ready["isProcessingContent"] is False
    assert attachments.get_media(**ids).execute() == PHOTO


# Subscriptions and locations


def test_subscriptions_insert_list_update_and_delete(service: Resource) -> None:
    subscriptions = service.subscriptions()
    body = {
        "collection": "timeline",
        "callbackUrl": "https://glassware.example/notify",
        "userToken": "user-1",
        "verifyToken": "verify-secret",
    }

    inserted = subscriptions.insert(body=body).execute()
    listed = subscriptions.list().execute()
    updated = subscriptions.update(
        id=inserted["id"], body={**body, "operation": ["DELETE"]}
    ).execute()
    subscriptions.delete(id=inserted["id"]).execute()

    assert inserted["kind"] == "mirror#subscription"
    assert {k: inserted[k] for k in body} == body
    assert inserted["operation"] == []
    assert RFC3339.match(inserted["updated"])
    assert listed == {"kind": "mirror#subscriptionsList", "items": [inserted]}
    assert updated["operation"] == ["DELETE"]
    assert subscriptions.list().execute()["items"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(
            {"callbackUrl": "https://x.example/n"}, "collection", id="no-coll"
        ),
        pytest.param({"collection": "timeline"}, "callbackUrl", id="no-callback"),
        pytest.param(
            {"collection": "timeline", "callbackUrl": "/notify"},
            "callbackUrl",
            id="relative",
        ),
        pytest.param(
            {"collection": "timeline", "callbackUrl": "http://glassware.example/n"},
            "callbackUrl",
            id="http-not-loopback",
        ),
        pytest.param(
            {"collection": "photos", "callbackUrl": "https://x.example/n"},
            "collection",
            id="unknown-collection",
        ),
    ],
)
def test_subscriptions_insert_refuses_a_bad_subscription(
    service: Resource, body: dict[str, str], field: str
) -> None:
    with pytest.raises(mirror.HttpError) as raised:
        service.subscriptions().insert(body=body).execute()

    (detail,) = error_body(raised.value)["error"]["errors"]
    assert raised.value.status_code == 400
    assert detail["location"] == field


def test_subscriptions_accept_http_on_loopback_and_when_allowed(
    emulator: EmulatorAdmin, service: Resource
) -> None:
    loopback = {"collection": "timeline", "callbackUrl": "http://127.0.0.1:9/notify"}
    remote = {"collection": "timeline", "callbackUrl": "http://glassware.example/n"}

    service.subscriptions().insert(body=loopback).execute()
    emulator.configure(allow_http=True)
    service.subscriptions().insert(body=remote).execute()

    assert len(service.subscriptions().list().execute()["items"]) == 2


def test_locations_get_latest_and_list(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, service: Resource
) -> None:
    emulator.add_location(mirror_user, 48.85, 2.35, timestamp="2014-05-01T10:00:00Z")
    newest = emulator.add_location(
        mirror_user, 51.5, -0.12, accuracy=5, displayName="London"
    )["location"]

    latest = service.locations().get(id="latest").execute()
    listed = service.locations().list().execute()

    assert latest == newest
    assert latest["kind"] == "mirror#location"
    assert [loc["latitude"] for loc in listed["items"]] == [51.5, 48.85]
    assert service.locations().get(id=newest["id"]).execute() == newest


# Authorization and errors


def test_api_call_without_token_answers_401_in_google_shape(
    emulator: EmulatorAdmin,
) -> None:
    answer = httpx.get(emulator.url + "/mirror/v1/timeline")

    error = answer.json()["error"]
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert error["code"] == 401
    assert error["status"] == "UNAUTHENTICATED"
    assert error["errors"][0]["reason"] == "required"


def test_missing_item_answers_404_in_google_shape(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    token = emulator.access_token(mirror_user)

    answer = httpx.get(
        emulator.url + "/mirror/v1/timeline/nothing",
        headers={"Authorization": f"Bearer {token}"},
    )

    message = "Timeline item 'nothing' was not found."
    assert answer.status_code == 404
    assert answer.json() == {
        "error": {
            "code": 404,
            "message": message,
            "errors": [{"domain": "global", "reason": "notFound", "message": message}],
            "status": "NOT_FOUND",
        }
    }


def test_expired_token_is_refreshed_on_401(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, service: Resource
) -> None:
    item = service.timeline().insert(body={"text": "before"}).execute()
    emulator.expire_tokens(mirror_user)
    mark = emulator.mark()

    service.timeline().get(id=item["id"]).execute()

    calls = [
        (c["method"], c["path"], c["status"]) for c in emulator.requests(after=mark)
    ]
    assert calls == [
        ("GET", f"/mirror/v1/timeline/{item['id']}", 401),
        ("POST", "/oauth2/v4/token", 200),
        ("GET", f"/mirror/v1/timeline/{item['id']}", 200),
    ]


def test_admin_lists_every_access_token_a_user_was_issued(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    credentials: Credentials,
    service: Resource,
) -> None:
    service.timeline().list().execute()
    first = credentials.token
    emulator.expire_tokens(mirror_user)
    service.timeline().list().execute()
    listed = httpx.get(f"{emulator.url}/emulator/users/{mirror_user.id}/tokens")

    assert first != credentials.token
    assert listed.json()["items"] == [
        {"token": first, "live": False},
        {"token": credentials.token, "live": True},
    ]
    assert emulator.access_tokens(mirror_user) == [first, credentials.token]
    assert mirror_user.id in {user.id for user in emulator.users()}


def test_short_token_lifetime_makes_the_client_refresh_before_calls(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, credentials: Credentials
) -> None:
    emulator.configure(token_lifetime=2)
    with mirror.build_mirror(credentials, root_url=emulator.root_url) as service:
        service.timeline().list().execute()
        first = credentials.token
        service.timeline().list().execute()

    assert credentials.token != first


def test_revoked_grant_answers_invalid_grant(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    emulator.revoke(mirror_user)
    credentials = mirror_user.credentials

    answer = httpx.post(
        credentials["token_uri"],
        data={
            "grant_type": "refresh_token",
            "client_id": credentials["client_id"],
            "client_secret": credentials["client_secret"],
            "refresh_token": credentials["refresh_token"],
        },
    )

    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"
    assert answer.json()["error_description"]


def test_token_endpoint_answers_like_google(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    credentials = mirror_user.credentials
    form = {
        "grant_type": "refresh_token",
        "client_id": credentials["client_id"],
        "client_secret": credentials["client_secret"],
        "refresh_token": credentials["refresh_token"],
    }

    granted = httpx.post(credentials["token_uri"], data=form).json()
    wrong_client = httpx.post(credentials["token_uri"], data={**form, "client_id": "x"})

    assert set(granted) == {"access_token", "expires_in", "token_type", "scope"}
    assert granted["token_type"] == "Bearer"
    assert granted["expires_in"] == 3600
    assert wrong_client.status_code == 401
    assert wrong_client.json()["error"] == "invalid_client"


def test_users_see_only_their_own_resources(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, service: Resource
) -> None:
    other = mirror.credentials_from_info(emulator.create_user().credentials)
    item, attachment = emulator.add_item_with_attachment(mirror_user, PHOTO)
    service.subscriptions().insert(
        body={"collection": "timeline", "callbackUrl": "https://x.example/n"}
    ).execute()
    emulator.add_location(mirror_user, 1.0, 2.0)

    with mirror.build_mirror(other, root_url=emulator.root_url) as intruder:
        calls = [
            intruder.timeline().get(id=item["id"]),
            intruder.timeline().delete(id=item["id"]),
            intruder.timeline().attachments().list(itemId=item["id"]),
            intruder.timeline()
            .attachments()
            .get_media(itemId=item["id"], attachmentId=attachment["id"]),
            intruder.locations().get(id="latest"),
        ]
        statuses = []
        for call in calls:
            with pytest.raises(mirror.HttpError) as raised:
                call.execute()
            statuses.append(raised.value.status_code)
        subscriptions = intruder.subscriptions().list().execute()["items"]
        timeline = intruder.timeline().list().execute()["items"]
    with pytest.raises(mirror.HttpError) as content:
        download(other, attachment["contentUrl"])

    assert statuses == [404] * 5
    assert mirror.status_of(content.value) == 404
    assert subscriptions == timeline == []


# Discovery documents


def test_discovery_document_is_rooted_at_the_emulator(
    emulator: EmulatorAdmin, credentials: Credentials
) -> None:
    document = httpx.get(emulator.url + "/discovery/v1/apis/mirror/v1/rest").json()
    http = google_auth_httplib2.AuthorizedHttp(credentials, http=build_http())

    with build_from_document(document, http=http) as service:
        listed = service.timeline().list().execute()

    assert document["rootUrl"] == emulator.root_url
    assert listed["kind"] == "mirror#timeline"


@pytest.mark.skipif(
    not GOOGLE_DISCOVERY.exists(),
    reason=f"Google's Mirror v1 discovery document is not at {GOOGLE_DISCOVERY}",
)
def test_glassware_built_from_google_discovery_works_with_only_root_changed(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    """A Glassware as Google's quickstarts built it, pointed at the emulator."""
    document = json.loads(GOOGLE_DISCOVERY.read_text())
    document["rootUrl"] = emulator.root_url
    info = mirror_user.credentials
    credentials = Credentials(  # type: ignore[no-untyped-call]
        None,
        refresh_token=info["refresh_token"],
        token_uri=info["token_uri"],
        client_id=info["client_id"],
        client_secret=info["client_secret"],
    )
    http = google_auth_httplib2.AuthorizedHttp(credentials, http=build_http())
    emulator.add_location(mirror_user, 37.42, -122.08)

    with build_from_document(document, http=http) as glassware:
        item = (
            glassware.timeline()
            .insert(
                body={"text": "Hello from Glassware"},
                media_body=media(PHOTO, "image/jpeg"),
            )
            .execute()
        )
        attachment_id = item["attachments"][0]["id"]
        fetched = glassware.timeline().get(id=item["id"]).execute()
        listed = glassware.timeline().list().execute()
        content = (
            glassware.timeline()
            .attachments()
            .get_media(itemId=item["id"], attachmentId=attachment_id)
            .execute()
        )
        subscription = (
            glassware.subscriptions()
            .insert(
                body={"collection": "timeline", "callbackUrl": "https://g.example/n"}
            )
            .execute()
        )
        subscriptions = glassware.subscriptions().list().execute()["items"]
        glassware.subscriptions().delete(id=subscription["id"]).execute()
        location = glassware.locations().get(id="latest").execute()
        glassware.timeline().delete(id=item["id"]).execute()
        deleted = glassware.timeline().get(id=item["id"]).execute()

    assert fetched == item
    assert [i["id"] for i in listed["items"]] == [item["id"]]
    assert content == PHOTO
    assert subscriptions == [subscription]
    assert location["latitude"] == 37.42
    assert deleted["isDeleted"] is True


# Notification delivery


async def test_delivery_answered_200_happens_once(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
) -> None:
    emulator.subscribe(
        mirror_user, callback_receiver.url, user_token="u", verify_token="verify-v"
    )
    item = emulator.add_item(mirror_user, text="hi")

    result = emulator.act(mirror_user, item["id"], "SHARE")
    attempts = await emulator.wait_for_deliveries(user=mirror_user, outcome="delivered")
    await emulator.wait_until_settled()

    (notification,) = result["notifications"]
    (call,) = callback_receiver.calls
    assert call.json() == notification["body"]
    assert call.headers["Content-Type"] == "application/json"
    assert [(a["attempt"], a["statusCode"]) for a in attempts] == [(1, 200)]
    assert len(emulator.deliveries(user=mirror_user)) == 1


async def test_delivery_answered_500_is_resent_until_200(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
) -> None:
    emulator.subscribe(mirror_user, callback_receiver.url, user_token="u")
    item = emulator.add_item(mirror_user)
    callback_receiver.respond(500, 500)

    emulator.act(mirror_user, item["id"], "SHARE")
    attempts = await emulator.wait_for_deliveries(3, user=mirror_user)

    assert [(a["attempt"], a["statusCode"], a["outcome"]) for a in attempts] == [
        (1, 500, "retrying"),
        (2, 500, "retrying"),
        (3, 200, "delivered"),
    ]
    assert len({json.dumps(c.json()) for c in callback_receiver.calls}) == 1


async def test_delivery_to_a_slow_callback_is_resent(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
) -> None:
    emulator.configure(delivery_timeout=0.3)
    emulator.subscribe(mirror_user, callback_receiver.url, user_token="u")
    item = emulator.add_item(mirror_user)
    callback_receiver.respond(200, delay=1.0)

    emulator.act(mirror_user, item["id"], "PIN")
    attempts = await emulator.wait_for_deliveries(2, user=mirror_user)

    first, second = attempts
    assert first["statusCode"] is None
    assert first["error"].startswith("timeout after 0.3 s")
    assert (second["attempt"], second["statusCode"]) == (2, 200)


async def test_delivery_gives_up_after_the_configured_attempts(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    emulator.configure(delivery_attempts=3)
    emulator.subscribe(mirror_user, f"http://127.0.0.1:{closed_port}/notify")
    item = emulator.add_item(mirror_user)

    emulator.act(mirror_user, item["id"], "SHARE")
    attempts = await emulator.wait_for_deliveries(3, user=mirror_user)
    await emulator.wait_until_settled()

    assert [a["outcome"] for a in attempts] == ["retrying", "retrying", "failed"]
    assert all(a["error"].startswith("ConnectError") for a in attempts)
    assert len(emulator.deliveries(user=mirror_user)) == 3


async def test_action_answers_before_its_delivery_ends(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
) -> None:
    emulator.subscribe(mirror_user, callback_receiver.url)
    item = emulator.add_item(mirror_user)
    callback_receiver.respond(200, delay=1.0)

    started = time.monotonic()
    emulator.act(mirror_user, item["id"], "SHARE")
    answered = time.monotonic() - started
    await emulator.wait_for_deliveries(user=mirror_user)

    assert answered < 0.5


@pytest.mark.parametrize(
    ("action", "payload", "operation", "user_actions"),
    [
        pytest.param("SHARE", None, "UPDATE", [{"type": "SHARE"}], id="share"),
        pytest.param("DELETE", None, "DELETE", [{"type": "DELETE"}], id="delete"),
        pytest.param(
            "CUSTOM",
            "thumbs-up",
            "UPDATE",
            [{"type": "CUSTOM", "payload": "thumbs-up"}],
            id="custom",
        ),
        pytest.param("PIN", None, "UPDATE", [{"type": "PIN"}], id="pin"),
        pytest.param("UNPIN", None, "UPDATE", [{"type": "UNPIN"}], id="unpin"),
        pytest.param("LAUNCH", None, "UPDATE", [{"type": "LAUNCH"}], id="launch"),
        pytest.param(
            "FUTURE_TYPE",
            "x",
            "UPDATE",
            [{"type": "FUTURE_TYPE", "payload": "x"}],
            id="unknown",
        ),
    ],
)
async def test_action_on_an_item_notifies_as_mirror_did(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
    action: str,
    payload: str | None,
    operation: str,
    user_actions: list[dict[str, str]],
) -> None:
    emulator.subscribe(
        mirror_user,
        callback_receiver.url,
        user_token="user-7",
        verify_token="s3cret-verify",
    )
    item = emulator.add_item(mirror_user, text="card")

    emulator.act(mirror_user, item["id"], action, payload)
    (call,) = await callback_receiver.wait_for(1)

    assert call.json() == {
        "collection": "timeline",
        "itemId": item["id"],
        "operation": operation,
        "userToken": "user-7",
        "verifyToken": "s3cret-verify",
        "userActions": user_actions,
    }


@pytest.mark.parametrize("action", ["REPLY", "REPLY_ALL"])
async def test_reply_notifies_insert_of_a_new_reply_item(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
    service: Resource,
    action: str,
) -> None:
    emulator.subscribe(mirror_user, callback_receiver.url, user_token="u")
    creator = {"id": "glassware", "displayName": "Glassware"}
    friend = {"id": "friend", "displayName": "Friend"}
    item = emulator.add_item(
        mirror_user, text="question?", creator=creator, recipients=[friend]
    )

    emulator.act(mirror_user, item["id"], action, text="an answer")
    (call,) = await callback_receiver.wait_for(1)
    body = call.json()
    reply = service.timeline().get(id=body["itemId"]).execute()

    expected = [creator, friend] if action == "REPLY_ALL" else [creator]
    assert (body["operation"], body["userActions"]) == ("INSERT", [{"type": action}])
    assert "verifyToken" not in body
    assert body["itemId"] != item["id"]
    assert (reply["inReplyTo"], reply["text"]) == (item["id"], "an answer")
    assert reply["recipients"] == expected


async def test_delete_action_leaves_a_tombstone(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, service: Resource
) -> None:
    item, _ = emulator.add_item_with_attachment(mirror_user, PHOTO)

    emulator.act(mirror_user, item["id"], "DELETE")

    assert service.timeline().get(id=item["id"]).execute()["isDeleted"] is True


async def test_pin_and_unpin_toggle_is_pinned(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, service: Resource
) -> None:
    item = emulator.add_item(mirror_user)

    emulator.act(mirror_user, item["id"], "PIN")
    pinned = service.timeline().get(id=item["id"]).execute()
    emulator.act(mirror_user, item["id"], "UNPIN")
    unpinned = service.timeline().get(id=item["id"]).execute()

    assert (pinned["isPinned"], unpinned["isPinned"]) == (True, False)


async def test_new_location_notifies_locations_subscriptions(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
) -> None:
    emulator.subscribe(
        mirror_user, callback_receiver.url, collection="locations", user_token="u"
    )

    emulator.add_location(mirror_user, 40.7, -74.0)
    (call,) = await callback_receiver.wait_for(1)

    assert call.json() == {
        "collection": "locations",
        "itemId": "latest",
        "operation": "UPDATE",
        "userToken": "u",
    }


async def test_notifications_follow_collection_and_operation_filters(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
) -> None:
    emulator.subscribe(mirror_user, callback_receiver.url, operation=["DELETE"])
    emulator.subscribe(mirror_user, callback_receiver.url, collection="locations")
    first = emulator.add_item(mirror_user)
    second = emulator.add_item(mirror_user)

    shared = emulator.act(mirror_user, first["id"], "SHARE")
    deleted = emulator.act(mirror_user, second["id"], "DELETE")
    await emulator.wait_until_settled()

    assert shared["notifications"] == []
    assert [n["body"]["operation"] for n in deleted["notifications"]] == ["DELETE"]
    assert len(callback_receiver.calls) == 1


async def test_share_convenience_captures_and_shares(
    emulator: EmulatorAdmin,
    mirror_user: EmulatorUser,
    callback_receiver: CallbackReceiver,
    credentials: Credentials,
) -> None:
    emulator.subscribe(mirror_user, callback_receiver.url, user_token="u")

    shared = emulator.share(mirror_user, PHOTO, text="look")
    (call,) = await callback_receiver.wait_for(1)

    assert call.json()["itemId"] == shared["item"]["id"]
    assert shared["item"]["text"] == "look"
    assert download(credentials, shared["attachment"]["contentUrl"]) == PHOTO


# Faults and records


def test_fault_answers_its_status_the_given_number_of_times(
    emulator: EmulatorAdmin, service: Resource
) -> None:
    item = service.timeline().insert(body={"text": "x"}).execute()
    fault_id = emulator.add_fault(r"^/mirror/v1/timeline/", status=503, times=1)

    with pytest.raises(mirror.HttpError) as raised:
        service.timeline().get(id=item["id"]).execute()
    service.timeline().get(id=item["id"]).execute()

    assert raised.value.status_code == 503
    assert error_body(raised.value)["error"]["status"] == "UNAVAILABLE"
    assert [(f["id"], f["hits"], f["times"]) for f in emulator.faults()] == [
        (fault_id, 1, 0)
    ]


def test_fault_latency_delays_the_answer(
    emulator: EmulatorAdmin, service: Resource
) -> None:
    emulator.add_fault("^/mirror/v1/timeline$", method="GET", latency=0.4)

    started = time.monotonic()
    service.timeline().list().execute()

    assert time.monotonic() - started >= 0.4


def test_fault_drop_closes_the_connection_without_answer(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser
) -> None:
    token = emulator.access_token(mirror_user)
    emulator.add_fault("^/mirror/v1/timeline$", drop=True, times=1)

    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(
            emulator.url + "/mirror/v1/timeline",
            headers={"Authorization": f"Bearer {token}"},
        )

    (record,) = [r for r in emulator.requests(user=mirror_user) if r["dropped"]]
    assert record["status"] is None


def test_requests_record_calls_to_google_endpoints_only(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, service: Resource
) -> None:
    mark = emulator.mark()

    service.timeline().list().execute()
    emulator.add_item(mirror_user)

    records = emulator.requests(after=mark)
    assert [(r["method"], r["path"], r["status"], r["userId"]) for r in records] == [
        ("POST", "/oauth2/v4/token", 200, mirror_user.id),
        ("GET", "/mirror/v1/timeline", 200, mirror_user.id),
    ]


# The app and the process


async def test_reset_forgets_everything() -> None:
    app = create_app(EmulatorConfig())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emu") as client:
        created = await client.post("/emulator/users", json={"id": "ada"})
        await client.post("/emulator/faults", json={"path": "x", "status": 500})
        await client.post("/emulator/reset")
        users = (await client.get("/emulator/users")).json()["items"]
        faults = (await client.get("/emulator/faults")).json()["items"]
        again = await client.post("/emulator/users", json={"id": "ada"})

    assert created.status_code == again.status_code == 201
    assert users == faults == []


async def test_config_changes_are_checked() -> None:
    app = create_app(EmulatorConfig())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emu") as client:
        wrong_name = await client.post("/emulator/config", json={"deliveryTries": 2})
        wrong_value = await client.post("/emulator/config", json={"tokenLifetime": 0})
        right = await client.post("/emulator/config", json={"deliveryAttempts": 2})

    assert wrong_name.status_code == wrong_value.status_code == 400
    assert "'deliveryTries'" in wrong_name.json()["error"]["message"]
    assert right.json()["deliveryAttempts"] == 2


def test_python_m_emulator_serves_on_the_given_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with EmulatorProcess.start(port=port) as started:
        health = httpx.get(f"http://127.0.0.1:{port}/emulator/health")

    assert started.url == f"http://127.0.0.1:{port}"
    assert health.json()["status"] == "ok"
