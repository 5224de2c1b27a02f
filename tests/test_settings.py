"""Settings come from MIRRORFLOW_* variables and fail loudly when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from mirrorflow.errors import SettingsError
from mirrorflow.settings import load_settings
from mirrorflow.temporal import tls_config


def test_settings_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRRORFLOW_TEMPORAL_ADDRESS", "temporal.internal:7233")
    monkeypatch.setenv("MIRRORFLOW_STORAGE_URL", "gs://bucket/prefix")
    monkeypatch.setenv("MIRRORFLOW_MIRROR_ROOT_URL", "http://127.0.0.1:9000")

    settings = load_settings()

    assert settings.temporal_address == "temporal.internal:7233"
    assert settings.storage_url == "gs://bucket/prefix"
    assert settings.storage_folder is None
    assert settings.mirror_root_url == "http://127.0.0.1:9000/"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        pytest.param(
            "MIRRORFLOW_STORAGE_URL", "s3://bucket", "gs://bucket", id="storage"
        ),
        pytest.param(
            "MIRRORFLOW_START_DEADLINE", "-1", "greater than 0", id="deadline"
        ),
        pytest.param(
            "MIRRORFLOW_CALLBACK_URL", "notify", "http:// or https://", id="callback"
        ),
        pytest.param(
            "MIRRORFLOW_INTAKE_FORWARD_RATE", "0", "greater than 0", id="forward-rate"
        ),
        pytest.param("MIRRORFLOW_TEMPORAL_TLS", "perhaps", "boolean", id="tls"),
        pytest.param(
            "MIRRORFLOW_WEBHOOK_PATH", "/readyz", "webhook's own route", id="path"
        ),
        pytest.param(
            "MIRRORFLOW_DATABASE_URL", "postgres://x", "sqlite:///", id="database"
        ),
        pytest.param(
            "MIRRORFLOW_WORKER_METRICS_PORT", "99999", "65535", id="metrics-port"
        ),
        pytest.param(
            "MIRRORFLOW_TEMPORAL_TLS_CERT",
            "/nonexistent/client.pem",
            "PEM file that exists",
            id="certificate-missing",
        ),
    ],
)
def test_settings_error_names_variable_value_and_expectation(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    message = str(caught.value)
    assert variable in message
    assert repr(value) in message
    assert expected in message


def test_settings_mask_secrets_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRRORFLOW_TEMPORAL_API_KEY", "very-secret-key")

    settings = load_settings()

    assert "very-secret-key" not in repr(settings)
    assert "very-secret-key" not in str(settings)
    assert settings.temporal_api_key is not None
    assert settings.temporal_api_key.get_secret_value() == "very-secret-key"


def test_settings_read_dotenv_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("MIRRORFLOW_TEMPORAL_NAMESPACE=from-dotenv\n")
    monkeypatch.chdir(tmp_path)

    settings = load_settings()

    assert settings.temporal_namespace == "from-dotenv"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        pytest.param({}, False, id="plain"),
        pytest.param({"MIRRORFLOW_TEMPORAL_TLS": "true"}, True, id="tls"),
        pytest.param({"MIRRORFLOW_TEMPORAL_API_KEY": "key"}, True, id="api-key"),
    ],
)
def test_temporal_cloud_settings_turn_on_tls(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: bool
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    tls = tls_config(load_settings())

    assert tls is expected


def test_temporal_client_certificate_makes_mutual_tls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "client.pem").write_bytes(b"certificate")
    (tmp_path / "client.key").write_bytes(b"private key")
    monkeypatch.setenv("MIRRORFLOW_TEMPORAL_TLS_CERT", str(tmp_path / "client.pem"))
    monkeypatch.setenv("MIRRORFLOW_TEMPORAL_TLS_KEY", str(tmp_path / "client.key"))

    tls = tls_config(load_settings())

    assert isinstance(tls, TLSConfig)
    assert tls.client_cert == b"certificate"
    assert tls.client_private_key == b"private key"


@pytest.mark.parametrize("given", ["CERT", "KEY"])
def test_client_certificate_and_key_go_together(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, given: str
) -> None:
    (tmp_path / "client.pem").write_bytes(b"certificate or key")
    monkeypatch.setenv(f"MIRRORFLOW_TEMPORAL_TLS_{given}", str(tmp_path / "client.pem"))

    with pytest.raises(SettingsError) as caught:
        load_settings()

    message = str(caught.value)
    assert "MIRRORFLOW_TEMPORAL_TLS_CERT and MIRRORFLOW_TEMPORAL_TLS_KEY" in message
    assert "set both" in message
