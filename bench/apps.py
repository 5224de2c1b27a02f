"""The baseline of the ack path: a bare Starlette app under mirrorflow's uvicorn.

``python -m bench.apps --port P`` serves an app that reads the request body
and answers 200, with the uvicorn settings and event loop that
``mirrorflow webhook`` uses (:func:`webhook.app.run` and
:func:`webhook.app.serve`; keep the two in step). Whatever the mirrorflow
webhook costs beyond this app is its own work: validation, the sender check,
the workflow start, metrics and the log line.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from webhook.app import _loop_factory


async def notify(request: Request) -> Response:
    """Read the body and answer 200."""
    await request.body()

    return JSONResponse({"status": "accepted"})


async def ready(request: Request) -> Response:
    """Answer 200: there is nothing to wait for."""
    return JSONResponse({"status": "ready"})


def create_bare_app(path: str = "/notify") -> Starlette:
    """Return the bare app."""
    return Starlette(
        routes=[
            Route(path, notify, methods=["POST"]),
            Route("/readyz", ready, methods=["GET"]),
        ]
    )


def main() -> None:
    """Serve the bare app on loopback until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    config = uvicorn.Config(
        create_bare_app(),
        host=args.host,
        port=args.port,
        http="auto",
        ws="none",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
    )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
