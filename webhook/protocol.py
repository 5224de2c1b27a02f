"""uvicorn's HTTP protocol with a deadline for each request's head.

uvicorn times out a connection that stays idle after a response, but not one
that opens and sends nothing, or sends part of a request line and headers and
then stalls: such a connection is held until the sender lets go. A few
hundred of them would use up the process's file descriptors, and Mirror's
pings would find no room. The protocol here gives every request head
:data:`HEAD_TIMEOUT` seconds from the connection's opening (or from the first
byte after the previous response), then answers 408 and closes. The body has
a deadline of its own, kept by the app (``BODY_TIMEOUT``).

Whether a request is being answered is read from uvicorn's protocols, which
keep it as ``cycle``: an attribute of theirs, not a promised interface.
Should a uvicorn release drop it, the deadline turns itself off with one
error in the log, and requests are served as uvicorn alone serves them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from uvicorn.protocols.http.auto import AutoHTTPProtocol

HEAD_TIMEOUT = 10.0
"""Seconds a connection has to send a request's line and headers.

Mirror sends its whole request at once and waits 10 s for the answer; a head
still arriving after as long comes from something else.
"""

CYCLE = "cycle"
"""Where uvicorn's HTTP protocols keep the request they are answering."""

log: structlog.stdlib.BoundLogger = structlog.get_logger("webhook")


def head_deadline_protocol(
    timeout: float,
    on_timeout: Callable[[], None],
    base: type[asyncio.Protocol] = AutoHTTPProtocol,
) -> type[asyncio.Protocol]:
    """Return ``base`` (uvicorn's httptools or h11 protocol) with a head deadline.

    Args:
        timeout: seconds each request head may take.
        on_timeout: called once for each connection closed for being late.
        base: the uvicorn protocol class to extend; both keep the request in
            progress as ``cycle``, which is what this relies on.
    """
    deadline_on = True

    body = (
        b'{"error":"The request line and headers did not arrive within '
        + f"{timeout:g}".encode()
        + b' s."}'
    )
    timed_out = (
        b"HTTP/1.1 408 Request Timeout\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )

    class HeadDeadline(base):  # type: ignore[misc,valid-type]
        """A uvicorn HTTP protocol that closes connections with a late head."""

        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._answering():
                self._disarm()
            elif self._head_timer is None:
                # Bytes of the next request's head: its deadline starts now.
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _answering(self) -> bool:
            """Whether a request's head has arrived and its answer is due.

            Without uvicorn's ``cycle`` to tell, the deadline is turned off,
            so that no connection is ever closed for it.
            """
            nonlocal deadline_on
            try:
                cycle: Any = getattr(self, CYCLE)
                return cycle is not None and not cycle.response_complete
            except AttributeError as exc:
                if deadline_on:
                    deadline_on = False
                    log.error(
                        "head_deadline_off", protocol=base.__name__, error=str(exc)
                    )
                self._disarm()
                return True

        def _arm(self) -> None:
            if deadline_on and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self._answering() or self.transport.is_closing():
                return
            on_timeout()
            self.transport.write(timed_out)
            self.transport.close()

    return HeadDeadline
