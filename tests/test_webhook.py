"""The webhook answers Mirror at once and starts one workflow per notification.

Every test runs against a real Temporal dev server; the workflow behind
``NotificationWorkflow`` is a stand-in defined here that completes, or fails
when the item id asks it to, so that dedupe and re-runs can be watched.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog.testing
from starlette.applications import Starlette
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from activities.subscribers import SubscriberStore
from mirrorflow.settings import Settings, load_settings
from mirrorflow.temporal import DATA_CONVERTER
from tests.fixtures.pipeline import readable
from tests.fixtures.secrets import SUITE_SECRETS
from tests.fixtures.servers import free_port, serving
from tests.fixtures.temporal import temporal_cli
from webhook import app as webhook_app
from webhook import protocol as webhook_protocol
from webhook.app import create_app
from webhook.notifications import MAX_BODY_BYTES, parse_notification
from workflows.models import (
    COLLECTION,
    ITEM_ID,
    OPERATION,
    SEARCH_ATTRIBUTES,
    USER_TOKEN,
    WORKFLOW_NAME,
    Notification,
    sha256_hex,
    workflow_id_for,
)

VERIFY_TOKEN = "verify-token-that-must-stay-secret"
CREDENTIALS = {
    "type": "authorized_user",
    "client_id": "client",
    "client_secret": "client-secret",
    "refresh_token": "refresh-secret",
    "token_uri": "http://127.0.0.1:1/token",
}
JSON = {"content-type": "application/json"}


@workflow.defn(name=WORKFLOW_NAME)
class StandInNotificationWorkflow:
    """Stand in for the real workflow: fail for item ids starting "fail"."""

    @workflow.run
    async def run(self, notification: Notification) -> str:
        if notification.item_id.startswith("fail"):
            raise ApplicationError("asked to fail", type="StandIn", non_retryable=True)

        return notification.item_id


def ping(**overrides: Any) -> dict[str, Any]:
    """Return a notification of alice's about an item of its own."""
    body: dict[str, Any] = {
        "collection": "timeline",
        "itemId": f"item-{uuid.uuid4().hex[:12]}",
        "operation": "UPDATE",
        "userToken": "alice",
        "verifyToken": VERIFY_TOKEN,
        "userActions": [{"type": "SHARE"}],
    }
    body.update(overrides)

    return body


def sample(app: Starlette, name: str, **labels: str) -> float:
    """Return the value of one of an app's metrics (0 when never set)."""
    value = app.state.webhook.metrics.registry.get_sample_value(name, labels)

    return 0.0 if value is None else float(value)


def starts(app: Starlette) -> tuple[float, float]:
    """Return how many workflows an app started and how many it joined."""
    return (
        sample(app, "mirrorflow_webhook_workflows_started_total"),
        sample(app, "mirrorflow_webhook_duplicates_total"),
    )


async def count_runs(client: Client, query: str, expected: int) -> int:
    """Return the number of runs matching a query, once it reaches ``expected``.

    Visibility lags behind starts on the dev server, so poll for a while and
    return the last count seen if it never gets there.
    """
    deadline = time.monotonic() + 5
    while True:
        count = (await client.count_workflows(query)).count
        if count == expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


class DevServer:
    """A Temporal dev server of one test's own, on disk so that it can restart."""

    def __init__(self, db_file: Path) -> None:
        self.db_file = db_file
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the server and wait until it answers."""
        attributes = [
            f"--search-attribute={key.name}=Keyword" for key in SEARCH_ATTRIBUTES
        ]
        self._process = await asyncio.create_subprocess_exec(
            temporal_cli(),
            "server",
            "start-dev",
            "--headless",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            f"--db-filename={self.db_file}",
            "--log-level=error",
            *attributes,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                await Client.connect(self.address)
            except RuntimeError:
                if time.monotonic() > deadline or self._process.returncode is not None:
                    raise
                await asyncio.sleep(0.1)
            else:
                return

    async def connect(self) -> Client:
        """Return a client of this server with mirrorflow's data converter."""
        return await Client.connect(self.address, data_converter=DATA_CONVERTER)

    async def stop(self) -> None:
        """Stop the server and wait until its process has exited."""
        if self._process is None:
            return
        self._process.terminate()
        await asyncio.wait_for(self._process.wait(), 10)
        self._process = None

    async def close(self) -> None:
        """Hand every history to the suite's secret scan, then stop for good.

        The session's last test scans the shared dev server itself; this
        server is gone by then, so its histories are kept as text now.
        """
        if self._process is not None and self._process.returncode is None:
            client = await self.connect()
            async for execution in client.list_workflows():
                handle = client.get_workflow_handle(
                    execution.id, run_id=execution.run_id
                )
                text = (await handle.fetch_history()).to_json()
                SUITE_SECRETS.observe(
                    f"history of {execution.id} on a file-backed server",
                    readable(text),
                )
        await self.stop()


@pytest.fixture
async def dev_server(tmp_path: Path) -> AsyncIterator[DevServer]:
    """Start a Temporal dev server that a test may stop and start again."""
    server = DevServer(tmp_path / "temporal.db")
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def store(tmp_path: Path) -> SubscriberStore:
    """Return a subscriber store that knows alice and her verify token."""
    store = SubscriberStore(tmp_path / "subscribers.db")
    store.add("alice", CREDENTIALS, verify_token_sha256=sha256_hex(VERIFY_TOKEN))

    return store


@pytest.fixture
def settings(task_queue: str, tmp_path: Path) -> Settings:
    """Return settings that send the test's workflows to its own task queue."""
    return load_settings(
        temporal_task_queue=task_queue,
        database_url=f"sqlite:///{tmp_path / 'subscribers.db'}",
        start_deadline=1.0,
        retry_after=7,
    )


@pytest.fixture
def app(
    settings: Settings, temporal_client: Client, store: SubscriberStore
) -> Starlette:
    """Return a webhook app on the session's dev server."""
    return create_app(settings, client=temporal_client, subscribers=store)


@pytest.fixture
async def http(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """Return an HTTP client that calls the app in process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as c:
        yield c


@pytest.fixture
async def worker(temporal_client: Client, task_queue: str) -> AsyncIterator[Worker]:
    """Run the stand-in workflow on the test's task queue."""
    async with Worker(
        temporal_client,
        task_queue=task_queue,
        workflows=[StandInNotificationWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ) as running:
        yield running


async def test_notify_valid_ping_starts_one_workflow(
    app: Starlette, http: httpx.AsyncClient, temporal_client: Client, task_queue: str
) -> None:
    body = ping()

    response = await http.post("/notify", json=body)

    assert response.status_code == 200
    workflow_id = response.json()["workflow_id"]
    assert await count_runs(temporal_client, f'TaskQueue="{task_queue}"', 1) == 1
    description = await temporal_client.get_workflow_handle(workflow_id).describe()
    assert description.workflow_type == WORKFLOW_NAME
    assert description.typed_search_attributes.get(USER_TOKEN) == "alice"
    assert description.typed_search_attributes.get(ITEM_ID) == body["itemId"]
    assert description.typed_search_attributes.get(COLLECTION) == "timeline"
    assert description.typed_search_attributes.get(OPERATION) == "UPDATE"
    summary = await description.static_summary()
    assert summary == f"timeline UPDATE item {body['itemId']} of user alice [SHARE]"
    assert starts(app) == (1, 0)


async def test_notify_workflow_input_holds_digest_not_token(
    http: httpx.AsyncClient, temporal_client: Client, worker: Worker
) -> None:
    response = await http.post("/notify", json=ping())
    handle = temporal_client.get_workflow_handle(response.json()["workflow_id"])
    await handle.result()

    history = await handle.fetch_history()

    started = history.events[0].workflow_execution_started_event_attributes
    [given] = await temporal_client.data_converter.decode(
        started.input.payloads, [Notification]
    )
    assert given.verify_token_sha256 == sha256_hex(VERIFY_TOKEN)
    for event in history.events:
        assert VERIFY_TOKEN.encode() not in event.SerializeToString()


async def test_notify_concurrent_copies_start_one_workflow(
    app: Starlette, temporal_client: Client, task_queue: str
) -> None:
    body = ping()

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        responses = await asyncio.gather(
            *(http.post("/notify", json=body) for _ in range(50))
        )

    assert [response.status_code for response in responses] == [200] * 50
    assert len({response.json()["workflow_id"] for response in responses}) == 1
    assert await count_runs(temporal_client, f'TaskQueue="{task_queue}"', 1) == 1
    assert starts(app) == (1, 49)


async def test_notify_resend_after_completion_starts_nothing(
    app: Starlette, http: httpx.AsyncClient, temporal_client: Client, worker: Worker
) -> None:
    body = ping()
    first = await http.post("/notify", json=body)
    workflow_id = first.json()["workflow_id"]
    await temporal_client.get_workflow_handle(workflow_id).result()

    resent = await http.post("/notify", json=body)

    assert resent.status_code == 200
    assert resent.json()["workflow_id"] == workflow_id
    assert await count_runs(temporal_client, f'WorkflowId="{workflow_id}"', 1) == 1
    assert starts(app) == (1, 1)


async def test_notify_resend_after_failure_starts_again(
    app: Starlette, http: httpx.AsyncClient, temporal_client: Client, worker: Worker
) -> None:
    body = ping(itemId=f"fail-{uuid.uuid4().hex[:12]}")
    first = await http.post("/notify", json=body)
    workflow_id = first.json()["workflow_id"]
    with pytest.raises(WorkflowFailureError):
        await temporal_client.get_workflow_handle(workflow_id).result()

    resent = await http.post("/notify", json=body)

    assert resent.status_code == 200
    assert await count_runs(temporal_client, f'WorkflowId="{workflow_id}"', 2) == 2
    assert starts(app) == (2, 0)


async def test_notify_accepts_json_with_parameters(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/notify",
        content=json.dumps(ping(futureField={"added": "later"})),
        headers={"content-type": "Application/JSON; charset=UTF-8"},
    )

    assert response.status_code == 200


async def test_notify_reads_a_body_sent_in_pieces(
    http: httpx.AsyncClient, temporal_client: Client, task_queue: str
) -> None:
    body = json.dumps(ping()).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16):
            yield body[start : start + 16]

    response = await http.post("/notify", content=pieces(), headers=JSON)

    assert response.status_code == 200
    assert response.json()["workflow_id"] == workflow_id_for(parse_notification(body))


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_notify_answers_other_methods_with_405(
    app: Starlette, http: httpx.AsyncClient, method: str
) -> None:
    response = await http.request(method, "/notify", json=ping())

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert f"not {method}" in response.json()["error"]
    assert starts(app) == (0, 0)


async def _oversized_chunks() -> AsyncIterator[bytes]:
    for _ in range(MAX_BODY_BYTES // 1024 + 1):
        yield b" " * 1024


BAD_REQUESTS = [
    pytest.param(
        {"content": b" " * (MAX_BODY_BYTES + 1), "headers": JSON},
        413,
        "larger than 65536 bytes",
        id="oversize-declared",
    ),
    pytest.param(
        {"content": _oversized_chunks, "headers": JSON},
        413,
        "larger than 65536 bytes",
        id="oversize-chunked",
    ),
    pytest.param(
        {"content": json.dumps(ping()), "headers": {"content-type": "text/plain"}},
        415,
        "Content-Type 'text/plain' is not accepted; send application/json",
        id="text-plain",
    ),
    pytest.param(
        {"content": json.dumps(ping())},
        415,
        "no Content-Type",
        id="no-content-type",
    ),
    pytest.param(
        {"content": b'{"collection": ', "headers": JSON},
        400,
        "not valid JSON",
        id="truncated-json",
    ),
    pytest.param(
        {"content": b'{"collection": "\xff"}', "headers": JSON},
        400,
        "not UTF-8",
        id="not-utf8",
    ),
    pytest.param(
        {"content": b"[" * 60000, "headers": JSON},
        400,
        "nested too deep",
        id="deep-nesting",
    ),
    pytest.param(
        {"json": ["timeline"]},
        400,
        "must be a JSON object (a Mirror notification), got an array",
        id="array",
    ),
]

BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"collection": 42}, "collection must be a non-empty string, got 42"),
    ({"itemId": ""}, 'itemId must be a non-empty string, got ""'),
    ({"itemId": "x" * 300}, "itemId must be at most 256 characters, got 300"),
    ({"itemId": "a\nb"}, "itemId must be text without control characters"),
    ({"itemId": "\ud800"}, "itemId must be text without control characters"),
    ({"operation": None}, "operation must be a non-empty string, got null"),
    ({"userToken": ["alice"]}, 'userToken must be a non-empty string, got ["alice"]'),
    ({"verifyToken": 12345}, "verifyToken must be a string when present, got a number"),
    ({"userActions": "SHARE"}, 'userActions must be a list when present, got "SHARE"'),
    ({"userActions": [3]}, 'userActions[0] must be an object with a "type", got 3'),
    ({"userActions": [{}]}, "userActions[0].type is missing"),
    ({"userActions": [{"type": "SHARE"}, {"type": 1}]}, "userActions[1].type must be"),
    ({"userActions": [{"type": "CUSTOM", "payload": 7}]}, "userActions[0].payload"),
]


@pytest.mark.parametrize(("request_args", "status", "message"), BAD_REQUESTS)
async def test_notify_refuses_bad_request(
    app: Starlette,
    http: httpx.AsyncClient,
    temporal_client: Client,
    task_queue: str,
    request_args: dict[str, Any],
    status: int,
    message: str,
) -> None:
    if callable(request_args.get("content")):
        request_args = {**request_args, "content": request_args["content"]()}

    response = await http.post("/notify", **request_args)

    assert response.status_code == status
    assert message in response.json()["error"]
    assert starts(app) == (0, 0)
    assert await count_runs(temporal_client, f'TaskQueue="{task_queue}"', 0) == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [pytest.param(o, m, id=next(iter(o))) for o, m in BAD_FIELDS],
)
async def test_notify_refuses_wrong_field(
    app: Starlette, http: httpx.AsyncClient, overrides: dict[str, Any], message: str
) -> None:
    # Encoded here because httpx cannot encode a lone surrogate itself.
    body = json.dumps(ping(**overrides))

    response = await http.post("/notify", content=body, headers=JSON)

    assert response.status_code == 400
    assert message in response.json()["error"]
    assert starts(app) == (0, 0)


async def test_notify_refuses_a_body_that_trickles_in_too_slowly(
    app: Starlette, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_app, "BODY_TIMEOUT", 0.5)
    body = json.dumps(ping()).encode()

    async def trickle() -> AsyncIterator[bytes]:
        yield body[:10]
        await asyncio.sleep(2)
        yield body[10:]

    response = await http.post("/notify", content=trickle(), headers=JSON)

    assert response.status_code == 408
    assert "did not arrive within 0.5 seconds" in response.json()["error"]
    assert sample(app, "mirrorflow_webhook_rejections_total", reason="body_timeout")
    assert starts(app) == (0, 0)


async def _exchange(url: str, *parts: bytes) -> bytes:
    """Send ``parts`` on one connection, reading the answer after each; return all.

    After each part but the last, the answer is read to the end of its JSON
    body; after the last, until the server closes the connection.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    received = b""
    try:
        for number, part in enumerate(parts, 1):
            writer.write(part)
            await writer.drain()
            if number < len(parts):
                received += await asyncio.wait_for(reader.readuntil(b"}"), 10)
        received += await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()

    return received


HALF_A_HEAD = b"POST /notify HTTP/1.1\r\nhost: webhook\r\ncontent-type: appl"


@pytest.mark.parametrize(
    "parser", [HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"]
)
@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([b""], id="nothing"),
        pytest.param([HALF_A_HEAD], id="half_a_head"),
        pytest.param(
            [b"GET /healthz HTTP/1.1\r\nhost: webhook\r\n\r\n", HALF_A_HEAD],
            id="half_the_next_head",
        ),
    ],
)
async def test_served_webhook_closes_a_connection_whose_head_is_late(
    app: Starlette, parts: list[bytes], parser: type[asyncio.Protocol]
) -> None:
    """A connection that stalls before its headers end is answered 408 and closed,
    while a ping on another connection is accepted, with either HTTP parser."""
    config = webhook_app.server_config(
        app, "127.0.0.1", 0, head_timeout=0.5, http=parser
    )
    async with serving(app, config) as url, httpx.AsyncClient(base_url=url) as http:
        stalled = asyncio.create_task(_exchange(url, *parts))
        accepted = await http.post("/notify", json=ping())
        received = await stalled

    last = received[received.rindex(b"HTTP/1.1 ") :]
    head, _, body = last.partition(b"\r\n\r\n")
    assert accepted.status_code == 200
    assert received.count(b"HTTP/1.1 ") == len(parts)
    assert head.splitlines()[0] == b"HTTP/1.1 408 Request Timeout"
    assert json.loads(body) == {
        "error": "The request line and headers did not arrive within 0.5 s."
    }
    assert sample(app, "mirrorflow_webhook_head_timeouts_total") == 1


async def test_head_deadline_turns_itself_off_without_uvicorns_cycle(
    app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should uvicorn keep its request under another name, the deadline is off,
    logged once, and requests are served as uvicorn alone serves them."""
    monkeypatch.setattr(webhook_protocol, "CYCLE", "request_being_answered")
    config = webhook_app.server_config(app, "127.0.0.1", 0, head_timeout=0.2)
    with structlog.testing.capture_logs() as logged:
        async with serving(app, config) as url, httpx.AsyncClient(base_url=url) as http:
            stalled = asyncio.create_task(_exchange(url, HALF_A_HEAD))
            answers = [await http.post("/notify", json=ping()) for _ in range(3)]
            # Three times the deadline: a working one would have closed it.
            await asyncio.sleep(0.6)
            left_open = not stalled.done()
            stalled.cancel()

    assert [answer.status_code for answer in answers] == [200] * 3
    assert left_open
    assert sample(app, "mirrorflow_webhook_head_timeouts_total") == 0
    turned_off = [entry for entry in logged if entry["event"] == "head_deadline_off"]
    assert len(turned_off) == 1
    assert "request_being_answered" in turned_off[0]["error"]


async def test_notify_refuses_oversize_bodies_over_http(app: Starlette) -> None:
    """Over a real connection, too large is answered whether declared or not."""
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        declared = await http.post(
            "/notify", content=b" " * (4 * MAX_BODY_BYTES), headers=JSON
        )
        chunked = await http.post("/notify", content=_oversized_chunks(), headers=JSON)
        after = await http.post("/notify", json=ping())

    assert (declared.status_code, chunked.status_code) == (413, 413)
    assert after.status_code == 200
    assert starts(app) == (1, 0)


async def test_notify_refuses_missing_field_by_name(
    app: Starlette, http: httpx.AsyncClient
) -> None:
    body = ping()
    del body["userToken"]

    response = await http.post("/notify", json=body)

    assert response.status_code == 400
    assert response.json() == {
        "error": "userToken is missing; expected a non-empty string."
    }
    assert starts(app) == (0, 0)


async def test_notify_refusals_never_quote_the_verify_token(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/notify", json=ping(verifyToken="x" * 2000))

    assert response.status_code == 400
    assert "x" * 50 not in response.text


async def test_bad_requests_start_nothing_on_the_queue(
    app: Starlette, http: httpx.AsyncClient, temporal_client: Client, task_queue: str
) -> None:
    """Refused requests leave no run behind, checked after a valid one shows."""
    for overrides, _ in BAD_FIELDS:
        await http.post("/notify", content=json.dumps(ping(**overrides)), headers=JSON)
    await http.post("/notify", content=json.dumps(ping()), headers={})
    good = await http.post("/notify", json=ping())

    count = await count_runs(temporal_client, f'TaskQueue="{task_queue}"', 1)

    assert count == 1
    runs = [
        run async for run in temporal_client.list_workflows(f'TaskQueue="{task_queue}"')
    ]
    assert [run.id for run in runs] == [good.json()["workflow_id"]]


async def test_notify_spoof_before_genuine_is_refused_with_sender_check(
    app: Starlette, http: httpx.AsyncClient, temporal_client: Client, task_queue: str
) -> None:
    genuine = ping()
    spoof = {**genuine, "verifyToken": "guessed"}

    refused = await http.post("/notify", json=spoof)
    accepted = await http.post("/notify", json=genuine)

    assert refused.status_code == 403
    assert "verifyToken does not match" in refused.json()["error"]
    assert accepted.status_code == 200
    assert await count_runs(temporal_client, f'TaskQueue="{task_queue}"', 1) == 1
    assert (
        sample(app, "mirrorflow_webhook_rejections_total", reason="wrong_verify_token")
        == 1
    )


async def test_notify_spoof_before_genuine_starts_apart_without_sender_check(
    settings: Settings, temporal_client: Client, task_queue: str
) -> None:
    app = create_app(
        settings.model_copy(update={"check_sender": False}), client=temporal_client
    )
    genuine = ping()
    spoof = {**genuine, "verifyToken": "guessed"}

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        spoofed = await http.post("/notify", json=spoof)
        accepted = await http.post("/notify", json=genuine)

    assert spoofed.status_code == accepted.status_code == 200
    assert spoofed.json()["workflow_id"] != accepted.json()["workflow_id"]
    assert await count_runs(temporal_client, f'TaskQueue="{task_queue}"', 2) == 2
    assert starts(app) == (2, 0)


async def test_notify_refuses_unknown_user_then_accepts_once_added(
    app: Starlette, http: httpx.AsyncClient, store: SubscriberStore
) -> None:
    body = ping(userToken="bob")
    refused = await http.post("/notify", json=body)
    store.add("bob", CREDENTIALS, verify_token_sha256=sha256_hex(VERIFY_TOKEN))

    accepted = await http.post("/notify", json=body)

    assert refused.status_code == 403
    assert refused.json()["error"] == (
        "userToken 'bob' is not a subscriber, or verifyToken does not match "
        "its subscription."
    )
    assert accepted.status_code == 200
    assert (
        sample(app, "mirrorflow_webhook_rejections_total", reason="unknown_sender") == 1
    )


async def test_notify_accepts_a_new_verify_token_at_once(
    http: httpx.AsyncClient, store: SubscriberStore
) -> None:
    """A subscriber given a new verify token is accepted despite the cache."""
    before = await http.post("/notify", json=ping())
    store.add("alice", CREDENTIALS, verify_token_sha256=sha256_hex("rotated"))

    after = await http.post("/notify", json=ping(verifyToken="rotated"))
    old = await http.post("/notify", json=ping())

    assert (before.status_code, after.status_code, old.status_code) == (200, 200, 403)


async def test_notify_without_temporal_answers_503_within_deadline(
    dev_server: DevServer, settings: Settings, store: SubscriberStore
) -> None:
    client = await dev_server.connect()
    app = create_app(settings, client=client, subscribers=store)
    await dev_server.stop()

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        began = time.monotonic()
        responses = await asyncio.gather(
            *(http.post("/notify", json=ping()) for _ in range(5))
        )
        elapsed = time.monotonic() - began

    assert [response.status_code for response in responses] == [503] * 5
    assert {response.headers["retry-after"] for response in responses} == {"7"}
    assert responses[0].json()["error"] == (
        "The notification could not be handed to Temporal within 1 s; try again later."
    )
    assert elapsed < settings.start_deadline + 0.5
    assert sample(app, "mirrorflow_webhook_requests_total", status="200") == 0


async def test_notify_answers_503_when_temporal_hangs(
    settings: Settings, store: SubscriberStore, temporal_env: WorkflowEnvironment
) -> None:
    """A Temporal that accepts connections but never answers costs one deadline."""
    async with FreezableProxy(
        temporal_env.client.service_client.config.target_host
    ) as proxy:
        client = await Client.connect(proxy.address, data_converter=DATA_CONVERTER)
        app = create_app(settings, client=client, subscribers=store)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
            proxy.freeze()
            began = time.monotonic()
            response = await http.post("/notify", json=ping())
            elapsed = time.monotonic() - began
            ready = await http.get("/readyz")

    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert settings.start_deadline <= elapsed < settings.start_deadline + 0.5
    assert ready.status_code == 503


async def test_notify_refuses_at_once_beyond_the_starts_in_flight(
    settings: Settings, store: SubscriberStore, temporal_env: WorkflowEnvironment
) -> None:
    """With as many starts waiting as allowed, the next ping is refused unstarted."""
    bounded = settings.model_copy(update={"max_starts_in_flight": 2})
    async with FreezableProxy(
        temporal_env.client.service_client.config.target_host
    ) as proxy:
        client = await Client.connect(proxy.address, data_converter=DATA_CONVERTER)
        app = create_app(bounded, client=client, subscribers=store)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
            proxy.freeze()
            waiting = [
                asyncio.create_task(http.post("/notify", json=ping())) for _ in range(2)
            ]
            for _ in range(500):
                if sample(app, "mirrorflow_webhook_starts_in_flight") == 2:
                    break
                await asyncio.sleep(0.01)
            refused = await http.post("/notify", json=ping())
            in_flight_then = sample(app, "mirrorflow_webhook_starts_in_flight")
            first_two = await asyncio.gather(*waiting)

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "7"
    assert refused.json() == {
        "error": "The webhook already has 2 notifications waiting for Temporal; "
        "try again later."
    }
    assert in_flight_then == 2
    assert [r.json()["error"] for r in first_two] == [
        "The notification could not be handed to Temporal within 1 s; try again later."
    ] * 2
    assert sample(app, "mirrorflow_webhook_rejections_total", reason="overloaded") == 1
    assert sample(app, "mirrorflow_webhook_starts_in_flight") == 0


async def test_notify_answers_503_when_temporal_refuses_the_start(
    settings: Settings, store: SubscriberStore, temporal_env: WorkflowEnvironment
) -> None:
    client = Client(
        temporal_env.client.service_client,
        namespace="no-such-namespace",
        data_converter=DATA_CONVERTER,
    )
    app = create_app(settings, client=client, subscribers=store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
        response = await http.post("/notify", json=ping())

    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json() == {
        "error": "Temporal did not accept the workflow start; try again later."
    }
    assert (
        sample(
            app, "mirrorflow_webhook_rejections_total", reason="temporal_unavailable"
        )
        == 1
    )


async def test_notify_answers_503_when_subscribers_cannot_be_read(
    settings: Settings, temporal_client: Client, tmp_path: Path
) -> None:
    store = SubscriberStore(tmp_path / "broken.db")
    (tmp_path / "broken.db").write_bytes(b"this is not a database" * 100)
    app = create_app(settings, client=temporal_client, subscribers=store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
        response = await http.post("/notify", json=ping())

    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert starts(app) == (0, 0)


async def test_readyz_follows_temporal(
    dev_server: DevServer, settings: Settings
) -> None:
    client = await dev_server.connect()
    app = create_app(settings, client=client, subscribers=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
        ready = await http.get("/readyz")
        await dev_server.stop()
        stopped = await http.get("/readyz")
        await dev_server.start()
        again = await _poll_ready(http)

    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert stopped.status_code == 503
    assert stopped.json()["status"] == "unavailable"
    assert again.status_code == 200


async def _poll_ready(http: httpx.AsyncClient) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        response = await http.get("/readyz")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.1)


async def test_app_connects_at_startup_when_given_no_client(
    settings: Settings, store: SubscriberStore, temporal_env: WorkflowEnvironment
) -> None:
    address = temporal_env.client.service_client.config.target_host
    app = create_app(
        settings.model_copy(update={"temporal_address": address}), subscribers=store
    )

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        ready = await http.get("/readyz")
        accepted = await http.post("/notify", json=ping())

    assert (ready.status_code, accepted.status_code) == (200, 200)
    assert starts(app) == (1, 0)


async def test_healthz_answers_while_alive(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


async def test_metrics_counts_answers_and_reasons(http: httpx.AsyncClient) -> None:
    await http.post("/notify", json=ping())
    await http.post("/notify", json=ping(itemId=""))

    text = (await http.get("/metrics")).text

    assert 'mirrorflow_webhook_requests_total{status="200"} 1.0' in text
    assert 'mirrorflow_webhook_requests_total{status="400"} 1.0' in text
    assert (
        'mirrorflow_webhook_rejections_total{reason="invalid_notification"} 1.0' in text
    )
    assert "mirrorflow_webhook_workflows_started_total 1.0" in text
    assert "mirrorflow_webhook_duplicates_total 0.0" in text
    assert "mirrorflow_webhook_ack_seconds_count 2.0" in text


async def test_apps_keep_metrics_apart(
    settings: Settings, temporal_client: Client, store: SubscriberStore
) -> None:
    first = create_app(settings, client=temporal_client, subscribers=store)
    second = create_app(settings, client=temporal_client, subscribers=store)
    transport = httpx.ASGITransport(app=first)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as http:
        await http.post("/notify", json=ping())

    assert starts(first) == (1, 0)
    assert starts(second) == (0, 0)


def _serve_command(port: int) -> list[str]:
    code = (
        "from mirrorflow.settings import load_settings\n"
        "from webhook.app import serve\n"
        f"serve(load_settings(), '127.0.0.1', {port})\n"
    )

    return [sys.executable, "-c", code]


def _environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORFLOW_")}
    settings = {
        f"MIRRORFLOW_{name.upper()}": value for name, value in variables.items()
    }

    return {**kept, "MIRRORFLOW_LOG_FORMAT": "json", **settings}


async def test_serve_logs_one_json_line_per_notification(
    tmp_path: Path,
    store: SubscriberStore,
    temporal_env: WorkflowEnvironment,
    task_queue: str,
) -> None:
    """The served webhook connects at startup and logs JSON, never the token."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *_serve_command(port),
        cwd=tmp_path,
        env=_environment(
            tmp_path,
            temporal_address=temporal_env.client.service_client.config.target_host,
            temporal_task_queue=task_queue,
            database_url=f"sqlite:///{store.path}",
        ),
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await _wait_until_served(http, process)
            accepted = await http.post("/notify", json=ping())
            spoofed = await http.post("/notify", json=ping(verifyToken="guessed"))
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)

    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    events = [line for line in lines if line["event"] == "notification_received"]
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
    assert process.returncode in (0, -signal.SIGTERM)
    assert (accepted.status_code, spoofed.status_code) == (200, 403)
    assert [event["status"] for event in events] == [200, 403]
    assert events[0]["workflow_id"] == accepted.json()["workflow_id"]
    assert events[0]["outcome"] == "started"
    assert events[1]["outcome"] == "wrong_verify_token"
    for event in events:
        assert event["user_token"] == "alice"
        assert event["collection"] == "timeline"
        assert event["operation"] == "UPDATE"
        assert isinstance(event["duration_ms"], float)
    assert VERIFY_TOKEN.encode() not in stderr
    assert b"guessed" not in stderr


async def _wait_until_served(
    http: httpx.AsyncClient, process: asyncio.subprocess.Process
) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            await http.get("/healthz")
        except httpx.TransportError:
            if process.returncode is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            return


async def test_serve_without_temporal_fails_with_clear_message(tmp_path: Path) -> None:
    process = await asyncio.to_thread(
        subprocess.run,
        _serve_command(free_port()),
        cwd=tmp_path,
        env=_environment(
            tmp_path,
            temporal_address=f"127.0.0.1:{free_port()}",
            temporal_connect_timeout="1",
            database_url=f"sqlite:///{tmp_path / 'subscribers.db'}",
        ),
        capture_output=True,
        timeout=30,
    )

    lines = [line for line in process.stderr.decode().splitlines() if line[:1] == "{"]
    [failure] = [json.loads(line) for line in lines]
    assert process.returncode != 0
    assert failure["event"] == "webhook_startup_failed"
    assert failure["error"].startswith("Could not reach Temporal at '127.0.0.1:")


class FreezableProxy:
    """A TCP proxy on loopback that can stop passing bytes, like a hung server."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self.address = ""
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"

        return self

    def freeze(self) -> None:
        """Hold every byte from now on, in both directions."""
        self._flowing.clear()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        for stream in (writer, up_writer):
            stream.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
