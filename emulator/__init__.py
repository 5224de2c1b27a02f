"""A Mirror API v1 emulator: REST surface, OAuth, notification delivery, admin API.

Google retired the Mirror API; this emulator is what lets mirrorflow run,
be tested and be demonstrated. It speaks the documented v1 REST surface
(timeline, attachments with media upload and download, subscriptions,
locations), hands out OAuth 2.0 tokens like Google's token endpoint, and
POSTs notifications to subscribers' callback URLs the way Mirror did. An
admin API under ``/emulator/`` plays the Glass user and injects faults.

Run it with ``python -m emulator --port 8090`` (or ``mirrorflow emulator``),
or in code::

    from emulator import EmulatorConfig, serve

    serve(EmulatorConfig(token_lifetime=60), host="127.0.0.1", port=8090)

:func:`create_app` returns the Starlette app itself, for an ASGI server of
your choice. All state is in memory and ends with the process.
"""

from emulator.app import create_app
from emulator.config import EmulatorConfig
from emulator.server import create_server, serve

__all__ = ["EmulatorConfig", "create_app", "create_server", "serve"]
