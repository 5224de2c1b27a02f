"""The emulator's settings: token lifetime, notification delivery, uploads."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_CLIENT_ID = "mirrorflow-emulator.apps.googleusercontent.com"
DEFAULT_CLIENT_SECRET = "emulator-client-secret"  # noqa: S105 (a well-known demo value)


_POSITIVE = (
    "token_lifetime",
    "delivery_timeout",
    "delivery_attempts",
    "max_upload_bytes",
    "chunk_bytes",
    "page_size",
    "record_limit",
)
_NOT_NEGATIVE = ("delivery_backoff", "delivery_backoff_max", "memory_limit_bytes")


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """How the emulator behaves; every field has Mirror's behaviour as default."""

    public_url: str | None = None
    """Base URL written into selfLink, contentUrl, token_uri and the discovery
    document's rootUrl; None means the URL each request arrived on."""

    client_id: str = DEFAULT_CLIENT_ID
    """The OAuth client id every user's credentials carry."""
    client_secret: str = DEFAULT_CLIENT_SECRET
    """The OAuth client secret every user's credentials carry."""
    token_lifetime: float = 3600.0
    """Seconds an access token stays valid."""

    allow_http: bool = False
    """Accept ``http://`` callback URLs on any host, not only on loopback."""
    delivery_timeout: float = 10.0
    """Seconds a callback has to answer one notification."""
    delivery_attempts: int = 5
    """Attempts per notification, the first one included."""
    delivery_backoff: float = 1.0
    """Seconds before the second attempt; each further wait doubles."""
    delivery_backoff_max: float = 60.0
    """Longest wait between two attempts."""

    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest media upload through the Mirror API (Mirror's limit: 10 MB)."""
    memory_limit_bytes: int = 1024 * 1024
    """Content larger than this is kept in a temporary file, not in memory."""
    chunk_bytes: int = 256 * 1024
    """Largest piece of a content download handed to the server at once."""
    page_size: int = 20
    """Items per page of timeline.list when the caller gives no maxResults."""
    record_limit: int = 10_000
    """Request records and delivery attempts kept; older ones are dropped."""

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"EmulatorConfig.{name} must be > 0, got {value!r}.")
        for name in _NOT_NEGATIVE:
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"EmulatorConfig.{name} must be >= 0, got {value!r}.")
        if self.public_url is not None and not re.match(
            r"^https?://[^/]+/?$", self.public_url
        ):
            raise ValueError(
                f"EmulatorConfig.public_url must be like 'http://host:port', "
                f"got {self.public_url!r}."
            )

    def to_json(self) -> dict[str, Any]:
        """Return the settings with camelCase names, as the admin API shows them."""
        return {_camel(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def updated(self, changes: Mapping[str, Any]) -> EmulatorConfig:
        """Return a copy with ``changes`` applied; names may be camelCase.

        Raises:
            ValueError: a name is unknown or a value has the wrong type.
        """
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for key, value in changes.items():
            name = _snake(key)
            if name not in fields:
                known = ", ".join(sorted(_camel(n) for n in fields))
                raise ValueError(f"Unknown setting {key!r}; expected one of {known}.")
            values[name] = _coerce(key, value, getattr(self, name), fields[name].type)

        return dataclasses.replace(self, **values)


def _coerce(key: str, value: Any, current: Any, annotation: Any) -> Any:
    if value is None and "None" in str(annotation):
        return None
    if isinstance(current, bool) or str(annotation) == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"Setting {key!r} expects true or false, got {value!r}.")
    if "int" in str(annotation):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"Setting {key!r} expects an integer, got {value!r}.")
    if "float" in str(annotation):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"Setting {key!r} expects a number, got {value!r}.")
    if isinstance(value, str):
        return value

    raise ValueError(f"Setting {key!r} expects a string, got {value!r}.")


def _camel(name: str) -> str:
    head, *rest = name.split("_")

    return head + "".join(part.capitalize() for part in rest)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", r"_\1", name).lower()
