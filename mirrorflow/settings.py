"""Read mirrorflow's settings from ``MIRRORFLOW_*`` variables and ``.env``.

Every process builds one :class:`Settings` at startup with :func:`load_settings`
and passes it down. A wrong value stops the process with a
:class:`~mirrorflow.errors.SettingsError` that names the variable, the value
and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from mirrorflow.errors import SettingsError

ENV_PREFIX = "MIRRORFLOW_"
GOOGLE_ROOT_URL = "https://www.googleapis.com/"

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseSettings):
    """Every setting of every mirrorflow process, typed, with its default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Temporal
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "mirrorflow"
    temporal_tls: bool = False
    temporal_tls_cert: Path | None = None
    temporal_tls_key: Path | None = None
    temporal_api_key: SecretStr | None = None
    temporal_connect_timeout: PositiveFloat = 10.0

    # Mirror API
    mirror_root_url: str = GOOGLE_ROOT_URL
    mirror_timeout: PositiveFloat = 30.0

    # Where things are kept
    storage_url: str = "file://./data/attachments"
    database_url: str = "sqlite:///./data/subscribers.db"

    # Webhook
    callback_url: str = "http://127.0.0.1:8080/notify"
    webhook_path: str = "/notify"
    start_deadline: PositiveFloat = 3.0
    retry_after: PositiveInt = 5
    check_sender: bool = True
    max_starts_in_flight: PositiveInt = 100
    intake: Literal["direct", "log"] = "direct"
    intake_path: Path = Path("data/intake.db")
    intake_max_backlog: PositiveInt = 100_000
    intake_max_bytes: PositiveInt = 256 * 1024 * 1024
    intake_forward_concurrency: PositiveInt = 32
    intake_forward_rate: PositiveFloat | None = None

    # Worker
    max_concurrent_activities: PositiveInt = 20
    max_concurrent_workflow_tasks: PositiveInt = 20
    mirror_calls_per_second: PositiveFloat | None = None
    graceful_shutdown: PositiveFloat = 30.0
    processing_timeout: PositiveFloat = 1800.0
    worker_metrics_port: Port | None = None

    # Logging
    log_level: str = "INFO"
    log_format: str = "auto"

    @field_validator("mirror_root_url", "callback_url")
    @classmethod
    def _is_http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("mirror_root_url")
    @classmethod
    def _ends_with_slash(cls, value: str) -> str:
        return value if value.endswith("/") else value + "/"

    @field_validator("storage_url")
    @classmethod
    def _is_storage_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "gs" and parts.netloc:
            return value
        if parts.scheme == "file" and (parts.netloc + parts.path):
            return value
        raise ValueError("expected file:///path/to/folder or gs://bucket/prefix")

    @field_validator("database_url")
    @classmethod
    def _is_sqlite_url(cls, value: str) -> str:
        if not value.startswith("sqlite:///") or len(value) == len("sqlite:///"):
            raise ValueError("expected sqlite:///path/to/file.db")
        return value

    @field_validator("webhook_path")
    @classmethod
    def _is_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("expected a path starting with '/'")
        if value in ("/healthz", "/readyz", "/metrics"):
            raise ValueError(f"{value} is the webhook's own route; choose another")
        return value

    @field_validator("temporal_tls_cert", "temporal_tls_key")
    @classmethod
    def _is_readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("expected the path of a PEM file that exists")
        return value

    @model_validator(mode="after")
    def _certificate_has_its_key(self) -> Settings:
        if (self.temporal_tls_cert is None) != (self.temporal_tls_key is None):
            raise ValueError(
                f"{ENV_PREFIX}TEMPORAL_TLS_CERT and {ENV_PREFIX}TEMPORAL_TLS_KEY "
                "go together: set both for mutual TLS, or neither"
            )
        return self

    @field_validator("log_level")
    @classmethod
    def _is_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("log_format")
    @classmethod
    def _is_format(cls, value: str) -> str:
        if value not in ("auto", "json", "console"):
            raise ValueError("expected auto, json or console")
        return value

    @property
    def storage_folder(self) -> Path | None:
        """Return the local folder of a ``file://`` storage URL, else None."""
        parts = urlsplit(self.storage_url)
        if parts.scheme != "file":
            return None

        return Path(parts.netloc + parts.path).expanduser()

    @property
    def database_path(self) -> Path:
        """Return the SQLite file named by the database URL."""
        return Path(self.database_url.removeprefix("sqlite:///")).expanduser()


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, ``.env`` and ``overrides``.

    Raises:
        SettingsError: a value is missing or malformed; the message names the
            ``MIRRORFLOW_*`` variable, the value given and what was expected.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        expected = error["msg"].removeprefix("Value error, ")
        if not field:
            # A rule across several variables names them itself.
            lines.append(f"{expected}.")
            continue
        variable = ENV_PREFIX + field.upper()
        given = error.get("input")
        lines.append(f"{variable} has value {given!r}: {expected}.")

    return "Invalid settings:\n  " + "\n  ".join(lines)
