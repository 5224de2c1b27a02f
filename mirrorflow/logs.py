"""Configure structlog and route the standard library's logs through it.

One renderer for everything a process prints: mirrorflow's own events,
uvicorn's, the Temporal SDK's and Google's clients'. JSON lines when the
output is not a terminal, readable console lines when it is.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

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

    # mirrorflow's own events skip the standard library: going through its
    # records, handler and formatter cost the webhook a quarter of each
    # request. They meet the same renderer on the same stream.
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            _drop_color_message,
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=_LineLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level]
        ),
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


class _LineLogger:
    """Write each rendered event as one line, under the name it was asked for.

    The name is what ``add_logger_name`` records, as it does for the
    standard library's loggers.
    """

    def __init__(self, name: str, stream: TextIO) -> None:
        self.name = name
        self._stream = stream

    def __repr__(self) -> str:
        return f"_LineLogger(name={self.name!r})"

    def msg(self, message: str) -> None:
        """Write one line and flush it, as the standard library's handler does."""
        self._stream.write(message + "\n")
        self._stream.flush()

    debug = info = warning = error = critical = exception = fatal = msg


class _LineLoggerFactory:
    """Make a :class:`_LineLogger` per name, all writing to one stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> _LineLogger:
        name = str(args[0]) if args else ""

        return _LineLogger(name, self._stream)


def _drop_color_message(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Remove uvicorn's ANSI-coloured copy of the message it logs."""
    event.pop("color_message", None)

    return event
