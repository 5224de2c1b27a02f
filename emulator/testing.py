"""Run the emulator for tests and benchmarks, and drive its admin API.

- :class:`EmulatorProcess` starts ``python -m emulator`` in a child process
  on a free loopback port and stops it again (it also stops by itself when
  its parent dies).
- :class:`EmulatorAdmin` is a small synchronous client of the admin API:
  users, captured content, user actions, faults, records; its ``wait_for_*``
  helpers are coroutines, so that a test's own event loop (serving a
  webhook, say) keeps running while they wait.
- :class:`CallbackReceiver` is a tiny HTTP server on a free port that
  records the notifications POSTed to it and answers as told: 200 by
  default, or a planned status after a planned delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Self

import httpx

__all__ = [
    "CallbackReceiver",
    "EmulatorAdmin",
    "EmulatorError",
    "EmulatorProcess",
    "EmulatorUser",
    "ReceivedCall",
]


class EmulatorError(RuntimeError):
    """The emulator refused an admin request, or could not be started."""


@dataclass(frozen=True)
class EmulatorUser:
    """A Glass user of the emulator and their ``authorized_user`` credentials."""

    id: str
    credentials: dict[str, str] = field(repr=False)


UserRef = EmulatorUser | str


def _user_id(user: UserRef) -> str:
    return user.id if isinstance(user, EmulatorUser) else user


class EmulatorProcess:
    """The emulator in a child process, listening on a free loopback port."""

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, log: IO[bytes]
    ) -> None:
        self.process = process
        self.url = url
        self._log = log

    def __repr__(self) -> str:
        return f"EmulatorProcess(url={self.url!r}, pid={self.process.pid})"

    @classmethod
    def start(
        cls,
        *options: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        timeout: float = 30.0,
    ) -> EmulatorProcess:
        """Start an emulator with command line ``options`` and wait until it answers.

        Without ``port``, the emulator gets a listening socket on a free port
        from this process, so that no other process can take the port first.

        Raises:
            EmulatorError: it exited or did not answer within ``timeout``.
        """
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        command = [sys.executable, "-m", "emulator", "--stop-on-stdin-eof"]
        command += ["--log-format", "json", "--host", host]
        with contextlib.ExitStack() as stack:
            if port is None:
                listener = stack.enter_context(socket.create_server((host, 0)))
                port = listener.getsockname()[1]
                command += ["--fd", str(listener.fileno())]
                inherited = [listener.fileno()]
            else:
                command += ["--port", str(port)]
                inherited = []
            process = subprocess.Popen(  # noqa: S603 (our own module)
                [*command, *options],
                pass_fds=inherited,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        emulator = cls(process, f"http://{host}:{port}", log)
        try:
            emulator._wait_until_ready(timeout)
        except BaseException:
            emulator.stop()
            raise

        return emulator

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmulatorError(
                    f"The emulator exited with status {self.process.returncode}:\n"
                    + self.log_text()
                )
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(
                    self.url + "/emulator/health", timeout=1, trust_env=False
                )
                if answer.status_code == 200:
                    return
            time.sleep(0.05)

        raise EmulatorError(
            f"The emulator did not answer at {self.url} within {timeout:g} s:\n"
            + self.log_text()
        )

    def log_text(self) -> str:
        """Return what the emulator has logged so far."""
        self._log.seek(0)

        return self._log.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the emulator: gracefully, else by force."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class EmulatorAdmin:
    """A client of a running emulator's admin API at ``url``."""

    def __init__(self, url: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    def __repr__(self) -> str:
        return f"EmulatorAdmin(url={self.url!r})"

    @property
    def root_url(self) -> str:
        """Return the root URL to build a Mirror client with (ends in ``/``)."""
        return self.url + "/"

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | Iterable[bytes] | None = None,
    ) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        answer = self._http.request(
            method, path, json=json, params=query, content=content
        )
        if answer.status_code >= 400:
            raise EmulatorError(
                f"{method} {path} answered {answer.status_code}: {answer.text}"
            )

        return answer.json() if answer.content else None

    # Service

    def health(self) -> dict[str, Any]:
        """Return the emulator's health summary."""
        health: dict[str, Any] = self._call("GET", "/emulator/health")

        return health

    def config(self) -> dict[str, Any]:
        """Return the settings in force, with camelCase names."""
        config: dict[str, Any] = self._call("GET", "/emulator/config")

        return config

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings, by their EmulatorConfig names: ``delivery_attempts=2``."""
        config: dict[str, Any] = self._call("POST", "/emulator/config", json=settings)

        return config

    def restore_config(self) -> None:
        """Go back to the settings the emulator started with."""
        self._call("DELETE", "/emulator/config")

    def reset(self) -> None:
        """Forget every user, item, subscription, fault and record."""
        self._call("POST", "/emulator/reset")

    # Users

    def create_user(self, user_id: str | None = None) -> EmulatorUser:
        """Create a Glass user; a fresh id unless ``user_id`` is given."""
        body = {"id": user_id} if user_id is not None else {}
        created = self._call("POST", "/emulator/users", json=body)

        return EmulatorUser(id=created["id"], credentials=created["credentials"])

    def users(self) -> list[EmulatorUser]:
        """Return every user the emulator has, with their credentials."""
        items = self._call("GET", "/emulator/users")["items"]

        return [EmulatorUser(id=u["id"], credentials=u["credentials"]) for u in items]

    def revoke(self, user: UserRef) -> None:
        """Revoke the user's grant: refreshing answers ``invalid_grant`` from now on."""
        self._call("POST", f"/emulator/users/{_user_id(user)}/revoke")

    def expire_tokens(self, user: UserRef) -> int:
        """Make the user's access tokens expire now; return how many there were."""
        expired: int = self._call(
            "POST", f"/emulator/users/{_user_id(user)}/expire-tokens"
        )["expired"]

        return expired

    def access_tokens(self, user: UserRef) -> list[str]:
        """Return every access token issued to the user, expired ones included."""
        answer = self._call("GET", f"/emulator/users/{_user_id(user)}/tokens")

        return [entry["token"] for entry in answer["items"]]

    def access_token(self, user: EmulatorUser) -> str:
        """Return a fresh access token of the user, from the token endpoint."""
        credentials = user.credentials
        answer = self._http.post(
            "/oauth2/v4/token",
            data={
                "grant_type": "refresh_token",
                "client_id": credentials["client_id"],
                "client_secret": credentials["client_secret"],
                "refresh_token": credentials["refresh_token"],
            },
        )
        if answer.status_code != 200:
            raise EmulatorError(f"The token endpoint answered {answer.text}")
        token: str = answer.json()["access_token"]

        return token

    # Timeline, as captured on Glass

    def add_item(self, user: UserRef, **fields: Any) -> dict[str, Any]:
        """Put an item on the user's timeline (no notification); return it."""
        item: dict[str, Any] = self._call(
            "POST", f"/emulator/users/{_user_id(user)}/timeline", json=fields
        )

        return item

    def item(self, user: UserRef, item_id: str) -> dict[str, Any]:
        """Return an item as the user's Glassware would see it, tombstones too."""
        item: dict[str, Any] = self._call(
            "GET", f"/emulator/users/{_user_id(user)}/timeline/{item_id}"
        )

        return item

    def add_attachment(
        self,
        user: UserRef,
        item_id: str,
        content: bytes | Iterable[bytes] = b"",
        *,
        content_type: str = "image/jpeg",
        processing_seconds: float | None = None,
        generated_size: int | None = None,
        seed: str | None = None,
    ) -> dict[str, Any]:
        """Attach content to an item; return the attachment with size and sha256.

        With ``generated_size`` the emulator makes that many deterministic
        bytes from ``seed`` instead of receiving ``content`` (see
        :func:`emulator.content.generated_chunks`). With
        ``processing_seconds`` the attachment stays processing that long.
        """
        attachment: dict[str, Any] = self._call(
            "POST",
            f"/emulator/users/{_user_id(user)}/timeline/{item_id}/attachments",
            params={
                "contentType": content_type,
                "processingSeconds": processing_seconds,
                "generatedSize": generated_size,
                "seed": seed,
            },
            content=content if generated_size is None else b"",
        )

        return attachment

    def add_item_with_attachment(
        self,
        user: UserRef,
        content: bytes | Iterable[bytes] = b"",
        *,
        content_type: str = "image/jpeg",
        text: str | None = None,
        processing_seconds: float | None = None,
        generated_size: int | None = None,
        seed: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Put an item with one attachment on the timeline; return both."""
        item = self.add_item(user, **({"text": text} if text is not None else {}))
        attachment = self.add_attachment(
            user,
            item["id"],
            content,
            content_type=content_type,
            processing_seconds=processing_seconds,
            generated_size=generated_size,
            seed=seed,
        )

        return self.item(user, item["id"]), attachment

    def share(
        self,
        user: UserRef,
        content: bytes | Iterable[bytes] = b"",
        *,
        content_type: str = "image/jpeg",
        text: str | None = None,
        processing_seconds: float | None = None,
        generated_size: int | None = None,
        seed: str | None = None,
    ) -> dict[str, Any]:
        """Capture and share content; return ``{item, attachment, notifications}``."""
        shared: dict[str, Any] = self._call(
            "POST",
            f"/emulator/users/{_user_id(user)}/share",
            params={
                "contentType": content_type,
                "text": text,
                "processingSeconds": processing_seconds,
                "generatedSize": generated_size,
                "seed": seed,
            },
            content=content if generated_size is None else b"",
        )

        return shared

    def act(
        self,
        user: UserRef,
        item_id: str | None,
        action_type: str,
        payload: str | None = None,
        *,
        text: str | None = None,
        operation: str | None = None,
    ) -> dict[str, Any]:
        """Perform a user action; return ``{item, notifications}``.

        ``item_id`` None performs an action that makes a new item (a voice
        command, ``LAUNCH``). ``text`` is what the user said, for replies.
        """
        action = {
            key: value
            for key, value in {
                "type": action_type,
                "payload": payload,
                "text": text,
                "operation": operation,
            }.items()
            if value is not None
        }
        path = f"/emulator/users/{_user_id(user)}"
        path += f"/timeline/{item_id}/actions" if item_id is not None else "/actions"
        result: dict[str, Any] = self._call("POST", path, json=action)

        return result

    def add_location(
        self, user: UserRef, latitude: float, longitude: float, **fields: Any
    ) -> dict[str, Any]:
        """Record a location fix; return ``{location, notifications}``."""
        body = {"latitude": latitude, "longitude": longitude, **fields}
        result: dict[str, Any] = self._call(
            "POST", f"/emulator/users/{_user_id(user)}/locations", json=body
        )

        return result

    def subscribe(
        self,
        user: UserRef,
        callback_url: str,
        *,
        collection: str = "timeline",
        operation: Sequence[str] = (),
        user_token: str | None = None,
        verify_token: str | None = None,
    ) -> dict[str, Any]:
        """Subscribe the user's Glassware without a Mirror API call; return it."""
        body: dict[str, Any] = {
            "collection": collection,
            "callbackUrl": callback_url,
            "operation": list(operation),
        }
        if user_token is not None:
            body["userToken"] = user_token
        if verify_token is not None:
            body["verifyToken"] = verify_token
        subscription: dict[str, Any] = self._call(
            "POST", f"/emulator/users/{_user_id(user)}/subscriptions", json=body
        )

        return subscription

    def subscriptions(self, user: UserRef) -> list[dict[str, Any]]:
        """Return the user's subscriptions."""
        items: list[dict[str, Any]] = self._call(
            "GET", f"/emulator/users/{_user_id(user)}/subscriptions"
        )["items"]

        return items

    # Faults

    def add_fault(
        self,
        path: str = ".*",
        *,
        method: str | None = None,
        status: int | None = None,
        reason: str | None = None,
        latency: float | None = None,
        drop: bool = False,
        drop_after_bytes: int | None = None,
        times: int | None = None,
    ) -> str:
        """Inject a fault into requests whose path ``path`` matches; return its id."""
        spec = {
            "path": path,
            "method": method,
            "status": status,
            "reason": reason,
            "latency": latency,
            "drop": drop,
            "dropAfterBytes": drop_after_bytes,
            "times": times,
        }
        fault = self._call(
            "POST",
            "/emulator/faults",
            json={k: v for k, v in spec.items() if v is not None},
        )
        fault_id: str = fault["id"]

        return fault_id

    @contextlib.contextmanager
    def fault(self, path: str = ".*", **options: Any) -> Iterator[str]:
        """Inject a fault for the duration of a ``with`` block."""
        fault_id = self.add_fault(path, **options)
        try:
            yield fault_id
        finally:
            self.remove_fault(fault_id)

    def faults(self) -> list[dict[str, Any]]:
        """Return the faults in force, with how often each applied."""
        items: list[dict[str, Any]] = self._call("GET", "/emulator/faults")["items"]

        return items

    def remove_fault(self, fault_id: str) -> None:
        """Remove one fault; a fault already gone is fine."""
        with contextlib.suppress(EmulatorError):
            self._call("DELETE", f"/emulator/faults/{fault_id}")

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._call("DELETE", "/emulator/faults")

    # Records

    def requests(
        self, *, after: int = 0, user: UserRef | None = None
    ) -> list[dict[str, Any]]:
        """Return the recorded calls to Google's endpoints numbered above ``after``."""
        params = {"after": after, "userId": _user_id(user) if user else None}
        items: list[dict[str, Any]] = self._call(
            "GET", "/emulator/requests", params=params
        )["items"]

        return items

    def mark(self) -> int:
        """Return the number of the latest recorded call, for ``requests(after=)``."""
        last: int = self._call("GET", "/emulator/requests", params={"after": 1 << 62})[
            "lastSeq"
        ]

        return last

    def deliveries(
        self,
        *,
        after: int = 0,
        user: UserRef | None = None,
        delivery_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return the recorded delivery attempts numbered above ``after``."""
        params = {
            "after": after,
            "userId": _user_id(user) if user else None,
            "deliveryId": delivery_id,
        }
        items: list[dict[str, Any]] = self._call(
            "GET", "/emulator/deliveries", params=params
        )["items"]

        return items

    def pending_deliveries(self) -> int:
        """Return how many notifications are still being delivered."""
        pending: int = self._call(
            "GET", "/emulator/deliveries", params={"after": 1 << 62}
        )["pending"]

        return pending

    async def wait_for_deliveries(
        self,
        count: int = 1,
        *,
        user: UserRef | None = None,
        delivery_id: str | None = None,
        outcome: str | None = None,
        after: int = 0,
        within: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` matching attempts are recorded; return them.

        ``outcome`` keeps only attempts that ended so: ``delivered``,
        ``retrying`` or ``failed``.

        Raises:
            TimeoutError: fewer arrived in ``within`` seconds.
        """
        deadline = time.monotonic() + within
        while True:
            attempts = [
                attempt
                for attempt in self.deliveries(
                    after=after, user=user, delivery_id=delivery_id
                )
                if outcome is None or attempt["outcome"] == outcome
            ]
            if len(attempts) >= count:
                return attempts
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(attempts)} of {count} delivery attempts recorded after "
                    f"{within:g} s: {attempts!r}"
                )
            await asyncio.sleep(0.05)

    async def wait_until_settled(self, *, within: float = 30.0) -> None:
        """Wait until no notification is being delivered any more.

        Raises:
            TimeoutError: deliveries were still under way after ``within`` s.
        """
        deadline = time.monotonic() + within
        while self.pending_deliveries():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Deliveries still under way after {within:g} s.")
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class ReceivedCall:
    """One request a :class:`CallbackReceiver` received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    """The status the receiver answered (or was about to answer)."""
    received: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)


class CallbackReceiver:
    """A tiny HTTP server that records what is POSTed to it and answers as told."""

    def __init__(self, host: str = "127.0.0.1", path: str = "/notify") -> None:
        self._calls: list[ReceivedCall] = []
        self._plans: deque[tuple[int, float]] = deque()
        self._default = (200, 0.0)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _ReceiverServer((host, 0), _ReceiverHandler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="callback-receiver",
            daemon=True,
        )
        port = self._server.server_address[1]
        self.url = f"http://{host}:{port}{path}"
        self._thread.start()

    def __repr__(self) -> str:
        return f"CallbackReceiver(url={self.url!r}, calls={len(self._calls)})"

    def respond(self, *statuses: int, delay: float = 0.0) -> None:
        """Answer the next requests with ``statuses`` in order, each after ``delay``."""
        with self._lock:
            self._plans.extend((status, delay) for status in statuses)

    def respond_by_default(self, status: int = 200, delay: float = 0.0) -> None:
        """Answer requests beyond the planned ones with ``status`` after ``delay``."""
        with self._lock:
            self._default = (status, delay)

    @property
    def calls(self) -> list[ReceivedCall]:
        """Return the requests received so far, oldest first."""
        with self._lock:
            return list(self._calls)

    async def wait_for(
        self, count: int = 1, *, within: float = 10.0
    ) -> list[ReceivedCall]:
        """Wait until ``count`` requests arrived; return all received.

        Raises:
            TimeoutError: fewer arrived in ``within`` seconds.
        """
        deadline = time.monotonic() + within
        while len(self._calls) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self._calls)} of {count} calls arrived at {self.url} "
                    f"within {within:g} s."
                )
            await asyncio.sleep(0.02)

        return self.calls

    def stop(self) -> None:
        """Stop serving; requests still waiting are answered at once."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _answer(self, handler: _ReceiverHandler, body: bytes) -> None:
        with self._lock:
            status, delay = self._plans.popleft() if self._plans else self._default
            self._calls.append(
                ReceivedCall(
                    method=handler.command,
                    path=handler.path,
                    headers=dict(handler.headers.items()),
                    body=body,
                    status=status,
                )
            )
        if delay:
            self._stopping.wait(delay)
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


class _ReceiverServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        receiver: CallbackReceiver,
    ) -> None:
        self.receiver = receiver
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that gave up waiting (a slow answer is the point)."""


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    server: _ReceiverServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.receiver._answer(self, body)

    do_PUT = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        """Keep quiet: the receiver's record is the log."""
