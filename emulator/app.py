"""Build the emulator's Starlette app and watch every call to the emulated endpoints.

:func:`create_app` wires the Mirror API, the token endpoint, the discovery
document and the admin API around one in-memory :class:`~emulator.state.Emulator`.
The app records each request to the emulated Google endpoints and applies
the injected faults before any route sees the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from emulator import admin, api
from emulator.config import EmulatorConfig
from emulator.discovery import DISCOVERY_PATH, discovery
from emulator.errors import ApiError, OAuthError, default_reason
from emulator.faults import Fault, is_observed
from emulator.resources import now, rfc3339
from emulator.state import Emulator

TOKEN_PATH = "/oauth2/v4/token"  # noqa: S105 (a path, not a secret)


class ConnectionDropped(ConnectionError):
    """A fault dropped the connection of a server that cannot really close it."""


class _Dropped(Exception):
    """The connection was closed on purpose; the request is over."""


class EmulatorApp(Starlette):
    """The emulator's Starlette app, recording and faulting Google's endpoints."""

    emulator: Emulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http" or not is_observed(scope["path"]):
            await super().__call__(scope, receive, send)
            return

        await self._observe(scope, receive, send)

    async def _observe(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        fault = self.emulator.faults.take(method, path)
        started, clock = now(), time.perf_counter()
        status: int | None = None
        dropped = False

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if fault is not None and fault.latency:
                await asyncio.sleep(fault.latency)
            if fault is not None and fault.drop:
                dropped = True
                await _drop(send)
            elif fault is not None and fault.status is not None:
                await _fault_response(fault, method, path)(
                    scope, receive, send_observed
                )
            elif fault is not None and fault.drop_after_bytes is not None:
                cut = _cutting(send_observed, send, fault.drop_after_bytes)
                await super().__call__(scope, receive, cut)
            else:
                await super().__call__(scope, receive, send_observed)
        except _Dropped:
            dropped = True
        finally:
            self.emulator.requests.add(
                {
                    "time": rfc3339(started),
                    "method": method,
                    "path": path,
                    "query": scope.get("query_string", b"").decode("latin-1"),
                    "userId": scope.get("emulator.user_id")
                    or self.emulator.token_owner(_bearer(scope)),
                    "status": None if dropped else status,
                    "dropped": dropped,
                    "faultId": fault.id if fault is not None else None,
                    "durationMs": round((time.perf_counter() - clock) * 1000, 3),
                }
            )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None

    return None


async def _drop(send: Send) -> None:
    """Close the client's connection without answering.

    Under uvicorn the ``send`` callable belongs to the request's cycle, which
    holds the connection's transport. Elsewhere (an in-process test client)
    there is no connection to close, so the request fails instead.
    """
    transport: Any = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionDropped("An injected fault dropped the connection.")

    transport.close()
    # Let the server notice the closed connection before the app returns, so
    # that it does not try to answer 500 on its own.
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _cutting(observed: Send, raw: Send, limit: int) -> Send:
    """Return a ``send`` that drops the connection after ``limit`` body bytes."""
    sent = 0

    async def send(message: Message) -> None:
        nonlocal sent
        if message["type"] != "http.response.body":
            await observed(message)
            return
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if sent + len(body) < limit or (sent + len(body) == limit and not more):
            sent += len(body)
            await observed(message)
            return

        await observed(
            {
                "type": "http.response.body",
                "body": body[: limit - sent],
                "more_body": True,
            }
        )
        await _drop(raw)
        raise _Dropped

    return send


def _fault_response(fault: Fault, method: str, path: str) -> Response:
    status = fault.status or 500
    message = f"Injected fault {fault.id}: {method} {path} answers {status}."
    if path == TOKEN_PATH:
        error = "server_error" if status >= 500 else "invalid_request"
        return OAuthError(status, error, message).response()

    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="https://accounts.google.com/"'
    if status in (429, 503):
        headers["Retry-After"] = "1"

    return ApiError(
        status, message, reason=fault.reason or default_reason(status), headers=headers
    ).response()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)

    return exc.response()


async def _oauth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OAuthError)

    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No method answers {request.method} {request.url.path}."
    else:
        message = f"{request.url.path} does not take {request.method}: {exc.detail}."

    return ApiError(exc.status_code, message, headers=exc.headers).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return ApiError(500, f"The emulator failed: {type(exc).__name__}: {exc}").response()


def create_app(config: EmulatorConfig | None = None) -> EmulatorApp:
    """Return the emulator as a Starlette app, with empty in-memory state.

    The state lives as long as the app (``app.emulator``). Content kept on
    disk and deliveries under way end with the app's lifespan.
    """
    emulator = Emulator(config or EmulatorConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await emulator.close()

    app = EmulatorApp(
        routes=[
            *api.routes(),
            Route(DISCOVERY_PATH, discovery, methods=["GET"]),
            *admin.routes(),
        ],
        exception_handlers={
            ApiError: _api_error,
            OAuthError: _oauth_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    app.emulator = emulator
    app.state.emulator = emulator

    return app
