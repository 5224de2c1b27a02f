"""Serve mirrorflow's Mirror v1 discovery document with the emulator as root.

The document is the project's own (``activities/mirror_v1.json``), the same
one mirrorflow's client is built from. A Glassware can build its client from
``/discovery/v1/apis/mirror/v1/rest`` and reach the emulator without further
configuration.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from emulator.api import base_url, json_response

DISCOVERY_PATH = "/discovery/v1/apis/mirror/v1/rest"


@functools.cache
def _document() -> dict[str, Any]:
    text = files("activities").joinpath("mirror_v1.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)

    return document


def document_for(root_url: str) -> dict[str, Any]:
    """Return the discovery document with every base URL under ``root_url``."""
    document = dict(_document())
    document["rootUrl"] = root_url
    document["baseUrl"] = root_url + document["servicePath"]

    return document


async def discovery(request: Request) -> Response:
    """Answer the discovery document, rooted at the emulator."""
    return json_response(document_for(base_url(request)))
