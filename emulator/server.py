"""Run the emulator under uvicorn."""

from __future__ import annotations

import socket

import uvicorn

from emulator.app import create_app
from emulator.config import EmulatorConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090


def create_server(
    config: EmulatorConfig | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_level: str = "info",
) -> uvicorn.Server:
    """Return a uvicorn server for a fresh emulator; ``await server.serve()`` runs it.

    Logging is left as the process configured it (see
    :func:`mirrorflow.logs.configure_logging`); the request record at
    ``/emulator/requests`` replaces an access log.
    """
    settings = uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        log_config=None,
        log_level=log_level.lower(),
        access_log=False,
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )

    return uvicorn.Server(settings)


def serve(
    config: EmulatorConfig | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    sock: socket.socket | None = None,
    log_level: str = "info",
) -> None:
    """Serve the emulator until interrupted (SIGINT or SIGTERM).

    Args:
        config: the emulator's settings; Mirror's behaviour by default.
        host: the interface to listen on.
        port: the port to listen on; 0 picks a free one.
        sock: an already listening socket to serve on instead of host/port.
        log_level: uvicorn's log level.
    """
    server = create_server(config, host=host, port=port, log_level=log_level)
    server.run(sockets=[sock] if sock is not None else None)
