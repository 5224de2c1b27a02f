"""Whatever arrives, the webhook answers without failing and starts no junk.

Properties checked on arbitrary bodies, content types, headers and sizes,
against the real dev server: the answer is never a 5xx; a 200 names a
workflow that exists; anything else leaves the start path untouched; and, at
the end, the task queue holds exactly the workflows that were answered 200.
"""

from __future__ import annotations

import asyncio
import json
import string
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.subscribers import SubscriberStore
from mirrorflow.settings import load_settings
from webhook.app import create_app
from webhook.notifications import MAX_BODY_BYTES
from workflows.models import sha256_hex

VERIFY_TOKEN = "fuzzing-verify-token"
JSON_TYPES = ("application/json", "application/json; charset=utf-8", "APPLICATION/JSON")
ACCEPTED_STATUSES = {200, 400, 413, 415}

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Fuzzing:
    """One app under fuzzing, its HTTP client and what it answered 200 to."""

    app: Starlette
    http: httpx.AsyncClient
    client: Client
    task_queue: str
    accepted: set[str] = field(default_factory=set)

    def starts(self) -> tuple[float, float]:
        """Return how many workflows the app started and joined so far."""
        registry = self.app.state.webhook.metrics.registry
        started = registry.get_sample_value(
            "mirrorflow_webhook_workflows_started_total"
        )
        joined = registry.get_sample_value("mirrorflow_webhook_duplicates_total")

        return (started or 0.0, joined or 0.0)

    async def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """Send a body; check the answer's status and what it started."""
        before = self.starts()

        response = await self.http.post("/notify", content=body, headers=headers)

        assert response.status_code in ACCEPTED_STATUSES | {403}, response.text
        if response.status_code == 200:
            workflow_id = response.json()["workflow_id"]
            await self.client.get_workflow_handle(workflow_id).describe()
            self.accepted.add(workflow_id)
        else:
            assert "error" in response.json()
            assert self.starts() == before

        return response

    async def count_runs(self) -> int:
        """Return the runs on the queue once visibility shows every accepted one."""
        query = f'TaskQueue="{self.task_queue}"'
        deadline = time.monotonic() + 10
        while True:
            count = (await self.client.count_workflows(query)).count
            if count >= len(self.accepted) or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.1)


async def _fuzzing(
    temporal_env: WorkflowEnvironment, database: Path, *, check_sender: bool
) -> AsyncIterator[Fuzzing]:
    task_queue = f"fuzz-{uuid.uuid4().hex[:12]}"
    store = SubscriberStore(database)
    store.add(
        "alice",
        {"type": "authorized_user", "refresh_token": "r"},
        verify_token_sha256=sha256_hex(VERIFY_TOKEN),
    )
    app = create_app(
        load_settings(
            temporal_task_queue=task_queue,
            database_url=f"sqlite:///{database}",
            check_sender=check_sender,
        ),
        client=temporal_env.client,
        subscribers=store,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
        fuzzing = Fuzzing(app, http, temporal_env.client, task_queue)
        yield fuzzing

    # After every example: the queue holds exactly the accepted workflows.
    assert await fuzzing.count_runs() == len(fuzzing.accepted)


@pytest.fixture(scope="module")
async def open_webhook(
    temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fuzzing]:
    """Fuzz an app that starts a workflow for any well-formed notification."""
    database = tmp_path_factory.mktemp("open") / "subscribers.db"
    async for fuzzing in _fuzzing(temporal_env, database, check_sender=False):
        yield fuzzing


@pytest.fixture(scope="module")
async def guarded_webhook(
    temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fuzzing]:
    """Fuzz an app that checks every sender against the subscribers."""
    database = tmp_path_factory.mktemp("guarded") / "subscribers.db"
    async for fuzzing in _fuzzing(temporal_env, database, check_sender=True):
        yield fuzzing


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


identifiers = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")),
    min_size=1,
    max_size=24,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
user_actions = st.lists(
    st.fixed_dictionaries(
        {"type": identifiers}, optional={"payload": st.text(max_size=40)}
    ),
    max_size=3,
)
notifications = st.fixed_dictionaries(
    {
        "collection": identifiers,
        "itemId": identifiers,
        "operation": identifiers,
        "userToken": identifiers,
    },
    optional={
        "verifyToken": st.text(max_size=40),
        "userActions": user_actions,
        "addedLater": json_values,
    },
)


@st.composite
def mutated_notifications(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a notification with one field removed or given an arbitrary value."""
    notification = dict(draw(notifications))
    key = draw(
        st.sampled_from(
            [
                "collection",
                "itemId",
                "operation",
                "userToken",
                "verifyToken",
                "userActions",
            ]
        )
    )
    if draw(st.booleans()):
        notification.pop(key, None)
    else:
        notification[key] = draw(json_values | st.lists(json_values, max_size=3))

    return notification


bodies = st.one_of(
    notifications.map(_encode),
    mutated_notifications().map(_encode),
    json_values.map(_encode),
    st.binary(max_size=300),
    st.integers(0, 3 * MAX_BODY_BYTES).map(lambda size: b"{" + b" " * size),
)
content_types = st.one_of(
    st.sampled_from(JSON_TYPES),
    st.sampled_from(["text/plain", "application/jsonl", "multipart/form-data", ""]),
    st.text(string.printable.strip(), max_size=40),
    st.none(),
)
extra_headers = st.dictionaries(
    st.sampled_from(["content-length", "content-encoding", "user-agent", "x-extra"]),
    st.text(string.ascii_letters + string.digits + " -;=", max_size=20),
    max_size=2,
)


def _headers(content_type: str | None, extra: dict[str, str]) -> dict[str, str]:
    headers = dict(extra)
    if content_type is not None:
        headers["content-type"] = content_type

    return headers


@FUZZ
@given(body=bodies, content_type=content_types, extra=extra_headers)
@example(body=b'{"itemId": "\\ud800"}', content_type="application/json", extra={})
@example(body=b"[" * 60000, content_type="application/json", extra={})
@example(body=b"1" * 5000, content_type="application/json", extra={})
@example(
    body=b"{}", content_type="application/json", extra={"content-length": "9" * 50}
)
async def test_notify_never_fails_on_arbitrary_requests(
    open_webhook: Fuzzing, body: bytes, content_type: str | None, extra: dict[str, str]
) -> None:
    response = await open_webhook.post(body, _headers(content_type, extra))

    if response.status_code == 200:
        sent = json.loads(body)
        for key in ("collection", "itemId", "operation", "userToken"):
            assert isinstance(sent[key], str)
            assert sent[key]


@FUZZ
@given(notification=notifications, content_type=st.sampled_from(JSON_TYPES))
async def test_notify_accepts_every_well_formed_notification(
    open_webhook: Fuzzing, notification: dict[str, Any], content_type: str
) -> None:
    response = await open_webhook.post(
        _encode(notification), {"content-type": content_type}
    )

    assert response.status_code == 200


@FUZZ
@given(
    notification=notifications,
    user_token=st.sampled_from(["alice", "bob"]) | identifiers,
    verify_token=st.sampled_from([VERIFY_TOKEN, "guessed", None]) | st.text(),
)
async def test_notify_starts_only_for_known_senders(
    guarded_webhook: Fuzzing,
    notification: dict[str, Any],
    user_token: str,
    verify_token: str | None,
) -> None:
    notification = {**notification, "userToken": user_token}
    notification.pop("verifyToken", None)
    if verify_token is not None:
        notification["verifyToken"] = verify_token

    response = await guarded_webhook.post(
        _encode(notification), {"content-type": "application/json"}
    )

    genuine = user_token == "alice" and verify_token == VERIFY_TOKEN
    assert response.status_code == (200 if genuine else 403)
