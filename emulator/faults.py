"""Injected faults and the record of calls to the emulated Google endpoints.

A fault matches requests by HTTP method and a regular expression searched in
the path, and does one or more of: wait ``latency`` seconds; answer
``status`` with Google's error JSON (its ``errors[].reason`` set to
``reason``); close the connection without an answer (``drop``); or close it
after ``dropAfterBytes`` bytes of the response body.
It applies to ``times`` requests, or to every matching request when
``times`` is absent. Faults and records cover the Mirror API, media upload,
content download, token and discovery routes, never the admin API.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from emulator.errors import bad_request
from emulator.resources import new_id

OBSERVED_PREFIXES = (
    "/mirror/",
    "/upload/",
    "/resumable/",
    "/content/",
    "/oauth2/",
    "/discovery/",
)
"""Paths whose requests are recorded and may meet a fault."""


def is_observed(path: str) -> bool:
    """Tell whether requests to ``path`` are recorded and subject to faults."""
    return path.startswith(OBSERVED_PREFIXES)


@dataclass
class Fault:
    """One injected fault and how often it still applies."""

    id: str
    path: re.Pattern[str]
    method: str | None = None
    status: int | None = None
    reason: str | None = None
    """The ``errors[].reason`` of the error answer; Google's usual one if None."""
    latency: float = 0.0
    drop: bool = False
    drop_after_bytes: int | None = None
    times: int | None = None
    """Requests it still applies to; None for all of them."""
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Tell whether the fault applies to a request."""
        return (
            (self.times is None or self.times > 0)
            and (self.method is None or self.method == method)
            and self.path.search(path) is not None
        )

    def to_json(self) -> dict[str, Any]:
        """Return the fault as the admin API shows it."""
        return {
            "id": self.id,
            "method": self.method,
            "path": self.path.pattern,
            "status": self.status,
            "reason": self.reason,
            "latency": self.latency,
            "drop": self.drop,
            "dropAfterBytes": self.drop_after_bytes,
            "times": self.times,
            "hits": self.hits,
        }


class FaultTable:
    """The faults in force, first added first matched."""

    def __init__(self) -> None:
        self._faults: dict[str, Fault] = {}

    def add(self, spec: Mapping[str, Any]) -> Fault:
        """Add a fault from its admin API description.

        Raises:
            ApiError: a field is missing or malformed.
        """
        unknown = set(spec) - {
            "method",
            "path",
            "status",
            "reason",
            "latency",
            "drop",
            "dropAfterBytes",
            "times",
        }
        if unknown:
            raise bad_request(
                f"Unknown fault fields {sorted(unknown)!r}; expected method, path, "
                "status, reason, latency, drop, dropAfterBytes, times.",
            )
        try:
            path = re.compile(_text(spec, "path", ".*"))
        except re.error as exc:
            raise bad_request(
                f"path {spec.get('path')!r} is not a regular expression: {exc}.",
                field="path",
            ) from None
        method = _text(spec, "method", "").upper() or None
        status = _number(spec, "status", int, low=100, high=599)
        drop = spec.get("drop", False)
        if not isinstance(drop, bool):
            raise bad_request(f"drop has value {drop!r}; expected true or false.")
        drop_after = _number(spec, "dropAfterBytes", int, low=0)
        latency = _number(spec, "latency", float, low=0.0)
        if status is None and not drop and drop_after is None and not latency:
            raise bad_request(
                "A fault needs at least one of status, latency, drop or "
                "dropAfterBytes.",
            )

        fault = Fault(
            id=new_id(),
            path=path,
            method=method,
            status=status,
            reason=_text(spec, "reason", "") or None,
            latency=latency or 0.0,
            drop=drop,
            drop_after_bytes=drop_after,
            times=_number(spec, "times", int, low=1),
        )
        self._faults[fault.id] = fault

        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """Return the first fault that applies to a request, counting the use."""
        for fault in self._faults.values():
            if fault.matches(method, path):
                fault.hits += 1
                if fault.times is not None:
                    fault.times -= 1
                return fault

        return None

    def remove(self, fault_id: str) -> bool:
        """Remove one fault; tell whether it existed."""
        return self._faults.pop(fault_id, None) is not None

    def clear(self) -> None:
        """Remove every fault."""
        self._faults.clear()

    def to_json(self) -> list[dict[str, Any]]:
        """Return the faults in force."""
        return [fault.to_json() for fault in self._faults.values()]


class RequestLog:
    """A bounded record of the requests made to the emulated Google endpoints."""

    def __init__(self, limit: int) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=limit)
        self._numbers = itertools.count(1)

    def add(self, entry: dict[str, Any]) -> None:
        """Record one finished request, numbering it."""
        entry["seq"] = next(self._numbers)
        self._entries.append(entry)

    def last_seq(self) -> int:
        """Return the number of the latest record, 0 when there is none."""
        return self._entries[-1]["seq"] if self._entries else 0

    def entries(
        self, *, after: int = 0, user_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Return the records numbered above ``after``, oldest first."""
        return [
            entry
            for entry in self._entries
            if entry["seq"] > after and (user_id is None or entry["userId"] == user_id)
        ]

    def clear(self) -> None:
        """Forget every record; numbering goes on."""
        self._entries.clear()


def _text(spec: Mapping[str, Any], name: str, default: str) -> str:
    value = spec.get(name, default)
    if not isinstance(value, str):
        raise bad_request(f"{name} has value {value!r}; expected a string.", field=name)

    return value


def _number(
    spec: Mapping[str, Any],
    name: str,
    kind: type[int] | type[float],
    *,
    low: float,
    high: float | None = None,
) -> Any:
    value = spec.get(name)
    if value is None:
        return None
    wrong_type = isinstance(value, bool) or not isinstance(value, int | float)
    if wrong_type or (kind is int and not isinstance(value, int)):
        raise bad_request(f"{name} has value {value!r}; expected a number.", field=name)
    if value < low or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise bad_request(f"{name} has value {value!r}; expected {bounds}.", field=name)

    return kind(value)
