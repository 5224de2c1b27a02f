"""Hostile input and secrets: spoofed senders, fuzzed requests, leaks, file modes.

The spoof matrix and the fuzz run against the real webhook over HTTP, the
session's dev server and the emulator. The last test of the session scans
every workflow history, every captured log line and every ``/metrics`` page
for every secret the suite made (see :mod:`tests.fixtures.secrets`).
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import json
import os
import random
import signal
import sqlite3
import stat
import string
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowExecution
from temporalio.testing import WorkflowEnvironment

from activities.notification import NotificationActivities
from activities.storage import LocalStorage
from activities.subscribers import SubscriberStore
from emulator.config import DEFAULT_CLIENT_SECRET
from emulator.testing import EmulatorAdmin
from mirrorflow import dev
from mirrorflow.errors import SettingsError, TemporalUnavailable
from mirrorflow.settings import load_settings
from mirrorflow.temporal import connect
from tests import test_webhook, test_webhook_fuzz
from tests.fixtures.pipeline import Pipeline, Subscribed, readable
from tests.fixtures.secrets import SecretRegistry
from tests.fixtures.servers import free_port, serving
from tests.test_webhook import count_runs
from webhook.app import create_app
from webhook.intake import IntakeLog
from webhook.metrics import WebhookMetrics
from webhook.notifications import MAX_BODY_BYTES, parse_notification
from webhook.senders import SenderCheck, Verdict
from workflows.models import (
    NotificationResult,
    Outcome,
    VerifyInput,
    canonical_json,
    sha256_hex,
    workflow_id_for,
)


def spoofs(genuine: Subscribed, other: Subscribed) -> dict[str, dict[str, Any]]:
    """Return the fields a forger changes in a genuine ping, by kind of forgery."""
    token = genuine.verify_token
    last = "0" if token[-1] != "0" else "1"

    return {
        "wrong-token": {"verifyToken": f"wrong-{uuid.uuid4().hex}"},
        "no-token": {"verifyToken": None},
        "empty-token": {"verifyToken": ""},
        "one-character-off": {"verifyToken": token[:-1] + last},
        "token-uppercased": {"verifyToken": token.upper()},
        "token-digest": {"verifyToken": sha256_hex(token)},
        "other-users-token": {"verifyToken": other.verify_token},
        "unknown-user": {"userToken": f"unknown-{uuid.uuid4().hex[:8]}"},
    }


SPOOFS = [
    "wrong-token",
    "no-token",
    "empty-token",
    "one-character-off",
    "token-uppercased",
    "token-digest",
    "other-users-token",
    "unknown-user",
]


def ping(subscribed: Subscribed, item_id: str, **changes: Any) -> dict[str, Any]:
    """Return the body Mirror would POST for a share, with a forger's changes."""
    body = {
        "collection": "timeline",
        "itemId": item_id,
        "operation": "UPDATE",
        "userToken": subscribed.user_token,
        "verifyToken": subscribed.verify_token,
        "userActions": [{"type": "SHARE"}],
    }
    body.update(changes)

    return {key: value for key, value in body.items() if value is not None}


@pytest.mark.parametrize("check_sender", [True, False], ids=["webhook", "workflow"])
@pytest.mark.parametrize("spoof", SPOOFS)
async def test_spoofed_ping_never_calls_mirror_nor_stores(
    pipeline: Pipeline, temporal_client: Client, spoof: str, check_sender: bool
) -> None:
    """A forged ping is refused by the webhook, or rejected by the run's verify.

    With the sender check on, the webhook answers 403 and starts nothing; with
    it off, the run's verify step rejects it. Either way Mirror is never
    called and nothing is stored, while the genuine ping that follows is.
    """
    genuine, other = pipeline.subscribe(), pipeline.subscribe()
    shared = pipeline.emulator.share(genuine.user, pipeline.remember(os.urandom(999)))
    item_id = shared["item"]["id"]
    settings = pipeline.settings.model_copy(
        update={
            "temporal_task_queue": pipeline.task_queue,
            "check_sender": check_sender,
        }
    )
    app = create_app(settings, client=temporal_client, subscribers=pipeline.subscribers)
    forged = ping(genuine, item_id, **spoofs(genuine, other)[spoof])
    mark = pipeline.emulator.mark()

    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        refused = await http.post("/notify", json=forged)
        if refused.status_code == 200:
            await run_to_end(pipeline, refused.json()["workflow_id"])
        calls = mirror_calls(pipeline.emulator, mark, genuine, other)
        stored_before = pipeline.storage.list()
        accepted = await http.post("/notify", json=ping(genuine, item_id))
        result = await run_to_end(pipeline, accepted.json()["workflow_id"])

    runs = 1 if check_sender else 2
    query = f'TaskQueue="{pipeline.task_queue}"'
    assert await count_runs(temporal_client, query, runs) == runs
    if check_sender:
        assert refused.status_code == 403
    else:
        assert refused.status_code == 200
        [forged_run, _] = [await handle.result() for handle in pipeline.handles]
        assert forged_run.outcome is Outcome.REJECTED
    assert calls == []
    assert stored_before == []
    assert result.outcome is Outcome.STORED


async def run_to_end(pipeline: Pipeline, workflow_id: str) -> NotificationResult:
    """Wait for a run the webhook started; its history is checked after the test."""
    handle = pipeline.client.get_workflow_handle(
        workflow_id, result_type=NotificationResult
    )
    pipeline.handles.append(handle)
    result: NotificationResult = await handle.result()

    return result


def mirror_calls(
    emulator: EmulatorAdmin, mark: int, *subscribed: Subscribed
) -> list[dict[str, Any]]:
    """Return the Mirror calls made as any of these users since ``mark``."""
    return [
        call
        for who in subscribed
        for call in emulator.requests(after=mark, user=who.user)
    ]


@contextmanager
def compare_digest_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Record every call of ``hmac.compare_digest`` while the block runs."""
    calls: list[Any] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    with monkeypatch.context() as patch:
        patch.setattr(hmac, "compare_digest", recording)
        yield calls


async def test_both_sender_checks_compare_digests_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook's check and the verify activity both use hmac.compare_digest.

    A timing measurement would be flaky; the mechanism is what is asserted.
    """
    store = SubscriberStore(tmp_path / "subscribers.db")
    digest, guess = sha256_hex("the-verify-token"), sha256_hex("a-guess")
    store.add(
        "alice",
        {"type": "authorized_user", "refresh_token": "a-refresh-token"},
        verify_token_sha256=digest,
    )
    activities = NotificationActivities(
        subscribers=store,
        storage=LocalStorage(tmp_path / "objects"),
        mirror_root_url="http://127.0.0.1:1/",
    )

    with compare_digest_calls(monkeypatch) as calls:
        verdict = await SenderCheck(store).check("alice", guess)
        verified = activities.verify(
            VerifyInput(user_token="alice", verify_token_sha256=guess)
        )

    assert verdict is Verdict.DIGEST_MISMATCH
    assert not verified.accepted
    assert calls == [(digest.encode(), guess.encode())] * 2


def test_settings_errors_never_show_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MIRRORFLOW_TEMPORAL_API_KEY", "temporal-api-key-secret")
    monkeypatch.setenv("MIRRORFLOW_START_DEADLINE", "soon")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert "MIRRORFLOW_START_DEADLINE" in str(caught.value)
    assert "temporal-api-key-secret" not in str(caught.value)


async def test_connection_errors_never_show_the_api_key() -> None:
    settings = load_settings(
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_api_key="temporal-api-key-secret",
        temporal_connect_timeout=1,
    )

    with pytest.raises(TemporalUnavailable) as caught:
        await connect(settings)

    assert "temporal-api-key-secret" not in repr(settings)
    assert "temporal-api-key-secret" not in settings.model_dump_json()
    assert "temporal-api-key-secret" not in str(caught.value)
    assert "temporal-api-key-secret" not in repr(caught.value.__cause__)


@contextmanager
def permissive_umask() -> Iterator[None]:
    """Let new files be world-readable unless the code that makes them says no."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_subscribers_database_and_its_journal_are_owner_only(tmp_path: Path) -> None:
    """The database and the WAL files SQLite adds beside it are 0600 under umask 0."""
    path = tmp_path / "data" / "subscribers.db"

    with permissive_umask():
        store = SubscriberStore(path)
        # A reader keeps the write-ahead log and its index on disk meanwhile.
        with closing(sqlite3.connect(path)) as reader:
            reader.execute("SELECT count(*) FROM subscribers").fetchone()
            store.add(
                "alice",
                {"type": "authorized_user", "refresh_token": "a-refresh-token"},
                verify_token_sha256=None,
            )
            modes = {file.name: _mode(file) for file in path.parent.iterdir()}

    assert modes == {
        "subscribers.db": 0o600,
        "subscribers.db-shm": 0o600,
        "subscribers.db-wal": 0o600,
    }
    # The folder it made for the database is its owner's alone too.
    assert _mode(path.parent) == 0o700


async def test_intake_log_and_its_journal_are_owner_only(tmp_path: Path) -> None:
    """The intake log names users and their items; only its owner reads it."""
    path = tmp_path / "data" / "intake.db"
    intake = IntakeLog(path, max_rows=10, max_bytes=10_000, metrics=WebhookMetrics())

    with permissive_umask():
        await intake.open()
        try:
            notification = parse_notification(json.dumps(test_webhook.ping()).encode())
            await intake.append(
                workflow_id_for(notification), canonical_json(notification)
            )
            modes = {file.name: _mode(file) for file in path.parent.iterdir()}
        finally:
            await intake.close()

    assert {name: modes[name] for name in ("intake.db", "intake.db-wal")} == {
        "intake.db": 0o600,
        "intake.db-wal": 0o600,
    }
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


def test_dev_demo_credentials_file_is_owner_only(
    emulator: EmulatorAdmin,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    suite_secrets: SecretRegistry,
) -> None:
    """`mirrorflow dev` writes the demo user's grant to a file only its owner reads."""
    monkeypatch.setattr(dev, "DEMO_USER", f"demo-{uuid.uuid4().hex[:8]}")
    emulator_port = int(emulator.url.rsplit(":", 1)[1])
    service = dev.DevService(
        data_dir=tmp_path,
        ports=dev.DevPorts(emulator=emulator_port, webhook=free_port()),
    )

    credentials = tmp_path / "demo-credentials.json"
    # A file left by an earlier run with a looser mode is narrowed too.
    credentials.write_text("{}")
    credentials.chmod(0o644)
    with permissive_umask():
        service.add_demo_user()

    suite_secrets.add(json.loads(credentials.read_text())["refresh_token"])
    assert _mode(credentials) == 0o600
    assert _mode(tmp_path / "subscribers.db") == 0o600


# The fuzz: thousands of requests, well-formed or hostile, against the webhook
# as deployed (``serve`` in a process of its own), each with the answers it
# may get. Set MIRRORFLOW_FUZZ_SEED to replay a run.

FUZZ_SEED = int(os.environ.get("MIRRORFLOW_FUZZ_SEED", "1203"))
FUZZ_CASES = 3000
FUZZ_VERIFY_TOKEN = f"fuzz-verify-{uuid.uuid4().hex}"
JSON_TYPE = {"content-type": "application/json"}


@dataclass(frozen=True)
class Case:
    """One request and the statuses it may be answered with."""

    kind: str
    body: bytes
    expected: frozenset[int]
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_TYPE))
    method: str = "POST"
    path: str = "/notify"


class Cases:
    """Draw fuzz cases from a seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self, low: int = 1, high: int = 24, *, ascii_only: bool = False) -> str:
        """Return printable text, sometimes far from ASCII."""
        size = self.rng.randint(low, high)
        if ascii_only or self.rng.random() < 0.5:
            return "".join(
                self.rng.choices(string.ascii_letters + string.digits, k=size)
            )
        alphabet = "aé漢字ß—🙂ॐ\u00a0 -_.:/?"
        return "".join(self.rng.choices(alphabet, k=size))

    def notification(self, *, genuine: bool = True) -> dict[str, Any]:
        """Return a notification of the fuzzed subscriber, or a forger's copy."""
        body: dict[str, Any] = {
            "collection": self.rng.choice(["timeline", "locations", self.text()]),
            "itemId": self.text(1, 60),
            "operation": self.rng.choice(["INSERT", "UPDATE", "DELETE"]),
            "userToken": "fuzzer",
            "verifyToken": FUZZ_VERIFY_TOKEN,
        }
        if self.rng.random() < 0.7:
            body["userActions"] = [
                {"type": self.rng.choice(["SHARE", "REPLY", "PIN", self.text()])}
                for _ in range(self.rng.randint(0, 3))
            ]
        if self.rng.random() < 0.2:
            body[self.text(ascii_only=True)] = {"added": [1, None, self.text()]}
        if not genuine:
            if self.rng.random() < 0.5:
                body["userToken"] = self.text()
            else:
                body["verifyToken"] = self.rng.choice(
                    [self.text(), "", FUZZ_VERIFY_TOKEN[:-1], FUZZ_VERIFY_TOKEN.upper()]
                )

        return body

    def case(self) -> Case:
        """Return one case of a kind picked at random."""
        kinds = [
            (self.genuine, 8),
            (self.spoofed, 8),
            (self.malformed_field, 20),
            (self.garbage, 15),
            (self.encoded, 10),
            (self.content_type, 10),
            (self.sized, 6),
            (self.nested, 4),
            (self.with_headers, 10),
            (self.elsewhere, 4),
        ]
        [make] = self.rng.choices(
            [make for make, _ in kinds], weights=[weight for _, weight in kinds]
        )

        return make()

    def genuine(self) -> Case:
        return Case("genuine", _json(self.notification()), frozenset({200}))

    def spoofed(self) -> Case:
        body = _json(self.notification(genuine=False))
        return Case("spoofed", body, frozenset({403}))

    def malformed_field(self) -> Case:
        body = self.notification(genuine=self.rng.random() < 0.5)
        key = self.rng.choice(
            ["collection", "itemId", "operation", "userToken", "verifyToken"]
            + ["userActions"] * 2
        )
        wrong: list[Any] = [42, 1.5, True, [], {}, [self.text()], {"a": 1}]
        if key != "verifyToken":
            wrong += ["", "x" * 300, "a\nb", "a\x00b", "a\x7fb", "a\u2028b"]
        if key == "verifyToken":
            wrong += ["t" * 1025]
        if key == "userActions":
            wrong = ["SHARE", [3], [{}], [{"type": ""}], [{"type": "S"}] * 33]
            wrong += [[{"type": "CUSTOM", "payload": 7}], {"type": "SHARE"}]
        if self.rng.random() < 0.2 and key != "verifyToken" and key != "userActions":
            del body[key]
        else:
            body[key] = self.rng.choice(wrong)
        return Case(f"malformed-{key}", _json(body), frozenset({400}))

    def garbage(self) -> Case:
        size = self.rng.choice([0, 1, 2, 10, 100, 2000])
        body = self.rng.randbytes(size)
        if self.rng.random() < 0.3:
            body = self.rng.choice([b"null", b"[]", b"1e999", b'"x"', b"{", b"{}"])
        return Case("garbage", body, frozenset({400}))

    def encoded(self) -> Case:
        text = json.dumps(self.notification(), ensure_ascii=False)
        encoding = self.rng.choice(
            ["utf-16", "utf-16-be", "utf-32", "utf-8-sig", "latin-1", "gzip"]
        )
        if encoding == "gzip":
            body = gzip.compress(text.encode())
            headers = {**JSON_TYPE, "content-encoding": "gzip"}
        elif encoding == "latin-1":
            # Latin-1 differs from UTF-8 only beyond ASCII: make sure there is some.
            text = text.replace('"itemId": "', '"itemId": "é', 1)
            body = text.encode("latin-1", "replace")
            headers = {"content-type": "application/json; charset=iso-8859-1"}
        else:
            body = text.encode(encoding)
            headers = {"content-type": f"application/json; charset={encoding}"}
        return Case(f"encoded-{encoding}", body, frozenset({400}), headers)

    def content_type(self) -> Case:
        genuine = self.genuine()
        refused = [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "json",
            "",
            self.text(ascii_only=True),
        ]
        if self.rng.random() < 0.3:
            accepted = ["Application/JSON", "application/json; charset=utf-16"]
            headers = {"content-type": self.rng.choice(accepted)}
            return Case("content-type", genuine.body, frozenset({200}), headers)
        if self.rng.random() < 0.2:
            return Case("no-content-type", genuine.body, frozenset({415}), {})
        headers = {"content-type": self.rng.choice(refused)}
        return Case("content-type", genuine.body, frozenset({415}), headers)

    def sized(self) -> Case:
        body = _json(self.notification())
        size = self.rng.choice(
            [MAX_BODY_BYTES - 1, MAX_BODY_BYTES, MAX_BODY_BYTES + 1, 1 << 20]
        )
        padded = body[:-1] + b" " * max(0, size - len(body)) + b"}"
        expected = {200} if len(padded) <= MAX_BODY_BYTES else {413}
        return Case(f"size-{size}", padded, frozenset(expected))

    def nested(self) -> Case:
        depth = self.rng.choice([100, 10_000, 60_000])
        body = self.rng.choice([b"[" * depth, b'{"a":' * depth, b"1" * depth])
        expected = {400} if len(body) <= MAX_BODY_BYTES else {413}
        return Case("nested", body, frozenset(expected))

    def with_headers(self) -> Case:
        case = self.rng.choice([self.genuine, self.spoofed, self.garbage])()
        headers = dict(case.headers)
        for _ in range(self.rng.randint(1, 30)):
            name = "x-" + self.text(1, 20, ascii_only=True)
            headers[name] = self.text(0, self.rng.choice([10, 4000]), ascii_only=True)
        headers["user-agent"] = self.text(ascii_only=True)
        return Case(f"headers-{case.kind}", case.body, case.expected, headers)

    def elsewhere(self) -> Case:
        body = _json(self.notification())
        if self.rng.random() < 0.5:
            method = self.rng.choice(["GET", "PUT", "DELETE", "PATCH"])
            return Case("method", body, frozenset({405}), method=method)
        path = self.rng.choice(["/", "/notify/", "/notify/x", "/%00", "/NOTIFY"])
        return Case("path", body, frozenset({404, 307}), path=path)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


# The webhook as deployed, stopping by itself if this process goes away.
_WEBHOOK = """
import os, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(3)), daemon=True).start()
from mirrorflow.settings import load_settings
from webhook.app import serve
serve(load_settings(), "127.0.0.1", int(sys.argv[1]))
"""


@asynccontextmanager
async def webhook_process(
    env: dict[str, str], log: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Serve the webhook in a process of its own; yield it and its base URL."""
    port = free_port()
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WEBHOOK,
            str(port),
            env=env,
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await http.get("/healthz")
                    break
                except httpx.TransportError:
                    assert process.returncode is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    await asyncio.sleep(0.1)
        yield process, url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 15)
        assert process.stdin is not None
        process.stdin.close()


def memory(pid: int) -> dict[str, int]:
    """Return a process's resident set size now and at its peak, in bytes."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0]) * 1024

    return figures


@dataclass
class Answer:
    """What the webhook answered to one case."""

    case: Case
    status: int
    text: str

    @property
    def is_expected(self) -> bool:
        """Return whether the status is one the case allows, with an error body."""
        if self.status not in self.case.expected:
            return False
        if self.case.path != "/notify" or self.case.method != "POST":
            return True
        body = json.loads(self.text)
        return "workflow_id" in body if self.status == 200 else "error" in body


async def send_all(
    http: httpx.AsyncClient, cases: list[Case], *, concurrency: int = 16
) -> list[Answer]:
    """Send cases a few at a time; return the answers in order."""
    gate = asyncio.Semaphore(concurrency)

    async def send(case: Case) -> Answer:
        async with gate:
            response = await http.request(
                case.method, case.path, content=case.body, headers=case.headers
            )
        return Answer(case, response.status_code, response.text)

    return await asyncio.gather(*(send(case) for case in cases))


RAW_REQUESTS = [
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n{}",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
    b"Content-Length: 500\r\n\r\n{",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n \r\n" * 70_000 + b"0\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nNo colon here\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nX-Nul: a\x00b\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    b"POST /notify HTTP/1.1\r\nHost: w\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n",
    b"POST /notify HTTP/1.1\r\nHost: w\r\n Folded: 1\r\n\r\n",
    b"POST /notify HTTP/9.9\r\nHost: w\r\n\r\n",
    b"POST /" + b"n" * 100_000 + b" HTTP/1.1\r\nHost: w\r\n\r\n",
    b"GET\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
    b"\r\n\r\n\r\n",
    b"POST http://elsewhere/notify HTTP/1.1\r\nHost: w\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}POST /notify HTTP/1.1\r\nHost: w\r\n\r\n",
]


async def send_raw(url: str, request: bytes) -> int | None:
    """Send bytes as they are; return the status answered, or None for none."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        line = await asyncio.wait_for(reader.readline(), 10)
    except ConnectionError:
        return None
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()

    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


async def trickle(
    url: str, body: bytes, *, piece: int, pause: float, whole: bool = False
) -> int:
    """Send a notification's body, or ``whole`` request, a few bytes at a time."""
    host, _, port = url.removeprefix("http://").partition(":")
    head = (
        b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        sent = head + body if whole else body
        if not whole:
            writer.write(head)
        for start in range(0, len(sent), piece):
            writer.write(sent[start : start + piece])
            await writer.drain()
            await asyncio.sleep(pause)
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()

    return int(line.split()[1])


async def stall(url: str, body: bytes) -> None:
    """Send half a notification, wait, and go away without the rest."""
    host, _, port = url.removeprefix("http://").partition(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /notify HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2]
    )
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.close()
    with suppress(ConnectionError):
        await writer.wait_closed()


async def health_checks_during(
    http: httpx.AsyncClient, busy: asyncio.Future[Any]
) -> int:
    """Check /healthz one call after another until ``busy`` is done.

    Return how many checks were answered while it was still running.
    """
    answered = 0
    while not busy.done():
        (await http.get("/healthz")).raise_for_status()
        answered += not busy.done()
        await asyncio.sleep(0.02)

    return answered


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_webhook_fuzz_answers_every_request_without_failing(
    temporal_env: WorkflowEnvironment, tmp_path: Path, suite_secrets: SecretRegistry
) -> None:
    """Thousands of hostile requests: no 5xx, no crash, no junk run, flat memory.

    Each case knows the statuses it may get. The webhook runs as deployed, in
    a process of its own; its memory is read before and after the second
    half of the cases, and slow senders trickle bytes at it meanwhile.
    """
    task_queue = f"fuzz-{uuid.uuid4().hex[:8]}"
    refresh_token = f"fuzz-refresh-{uuid.uuid4().hex}"
    suite_secrets.add(FUZZ_VERIFY_TOKEN, refresh_token)
    SubscriberStore(tmp_path / "subscribers.db").add(
        "fuzzer",
        {"type": "authorized_user", "refresh_token": refresh_token},
        verify_token_sha256=sha256_hex(FUZZ_VERIFY_TOKEN),
    )
    kept = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORFLOW_")}
    address = temporal_env.client.service_client.config.target_host
    env = {
        **kept,
        "MIRRORFLOW_TEMPORAL_ADDRESS": address,
        "MIRRORFLOW_TEMPORAL_TASK_QUEUE": task_queue,
        "MIRRORFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'subscribers.db'}",
        "MIRRORFLOW_LOG_FORMAT": "json",
    }
    cases = Cases(FUZZ_SEED)
    half = FUZZ_CASES // 2
    genuine = _json(cases.notification())
    log = tmp_path / "webhook.log"

    async with (
        webhook_process(env, log) as (process, url),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        answers = await send_all(http, [cases.case() for _ in range(half)])
        before = memory(process.pid)
        answers += await send_all(http, [cases.case() for _ in range(half)])
        raw = [await send_raw(url, request) for request in RAW_REQUESTS]
        slow = asyncio.gather(
            *(trickle(url, genuine, piece=16, pause=0.05) for _ in range(20)),
            *(trickle(url, genuine, piece=8, pause=0.05, whole=True) for _ in range(5)),
            *(stall(url, genuine) for _ in range(10)),
        )
        served = await health_checks_during(http, slow)
        trickled = await slow
        after = memory(process.pid)
        metrics = (await http.get("/metrics")).text
        crashed = process.returncode is not None

    suite_secrets.observe("the fuzzed webhook's log", log.read_bytes())
    suite_secrets.observe("the fuzzed webhook's /metrics", metrics)
    unexpected = [
        (answer.case.kind, answer.status, answer.text[:120])
        for answer in answers
        if not answer.is_expected
    ]
    accepted = {json.loads(a.text)["workflow_id"] for a in answers if a.status == 200}
    accepted.add(workflow_id_for(parse_notification(genuine)))
    query = f'TaskQueue="{task_queue}"'
    assert unexpected == [], "\n".join(map(str, unexpected))
    assert not crashed
    assert all(status is None or status < 500 for status in raw), raw
    assert trickled == [200] * 25 + [None] * 10
    # Slow senders hold connections for a second or more; others are served.
    assert served >= 5
    assert started(metrics) == len(accepted)
    assert await count_runs(temporal_env.client, query, len(accepted)) == len(accepted)
    assert after["VmRSS"] - before["VmRSS"] < 8 << 20


def started(metrics: str) -> int:
    """Return how many workflows a webhook's metrics say it started."""
    [line] = [
        line
        for line in metrics.splitlines()
        if line.startswith("mirrorflow_webhook_workflows_started_total ")
    ]

    return int(float(line.split()[1]))


@pytest.mark.session_end
async def test_suite_leaks_no_secret_into_histories_logs_or_metrics(
    temporal_env: WorkflowEnvironment,
    emulator_session: EmulatorAdmin,
    suite_secrets: SecretRegistry,
) -> None:
    """After every other test: no secret in any history, log line or metrics page.

    The secrets are those the suite registered (verify tokens, refresh and
    access tokens of every pipeline and fuzz test), the fixed ones other test
    modules use, and every token the session's emulator issued or delivered:
    each user's refresh token, every access token it handed out (refreshed
    ones too) and the verify token of every notification it sent. The
    histories are every run of the session's dev server.
    """
    suite_secrets.add(
        test_webhook.VERIFY_TOKEN,
        test_webhook.CREDENTIALS["client_secret"],
        test_webhook.CREDENTIALS["refresh_token"],
        test_webhook_fuzz.VERIFY_TOKEN,
        DEFAULT_CLIENT_SECRET,
    )
    for user in emulator_session.users():
        suite_secrets.add(user.credentials["refresh_token"])
        suite_secrets.add(*emulator_session.access_tokens(user))
    for attempt in emulator_session.deliveries():
        suite_secrets.add(attempt["body"].get("verifyToken"))
    client = temporal_env.client
    executions = [execution async for execution in client.list_workflows()]
    gate = asyncio.Semaphore(16)

    async def history(execution: WorkflowExecution) -> tuple[str, str]:
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        async with gate:
            text = (await handle.fetch_history()).to_json()
        return f"history of {execution.id}", readable(text)

    histories = await asyncio.gather(*(history(e) for e in executions))
    logs = ("captured log lines", "\n".join(suite_secrets.log_lines))

    leaks = [
        (where, secret)
        for where, text in [*histories, *suite_secrets.texts, logs]
        for secret in suite_secrets.leaks(text)
    ]
    assert len(suite_secrets.secrets) > 10
    assert leaks == []
