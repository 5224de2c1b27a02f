"""Configure structlog and route the standard library's logs through it.

One renderer for everything a process prints: mirrorflow's own events,
uvicorn's, the Temporal SDK's and Google's clients'. JSON lines when the
output is not a terminal, readable console lines when it is.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "INFO", log_format: str = "auto") -> None:
    """Send structlog's and the standard library's logs to one renderer.

    Args:
        level: the lowest level printed, by name.
        log_format: ``json``, ``console``, or ``auto`` (console on a terminal).
    """
    use_console = log_format == "console" or (
        log_format == "auto" and sys.stderr.isatty()
    )
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if use_console
        else structlog.processors.JSONRenderer()
    )

    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_color_message,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # One line per request comes from the webhook itself.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # Google's discovery client and httpx log every URL they request at INFO.
    for chatty in ("googleapiclient.discovery", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _drop_color_message(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Remove uvicorn's ANSI-coloured copy of the message it logs."""
    event.pop("color_message", None)

    return event
