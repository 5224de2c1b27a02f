"""Settings come from MIRRORFLOW_* variables and fail loudly when wrong."""

from __future__ import annotations

import pytest

from mirrorflow.errors import SettingsError
from mirrorflow.settings import load_settings


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
        pytest.param("MIRRORFLOW_TEMPORAL_TLS", "perhaps", "boolean", id="tls"),
        pytest.param(
            "MIRRORFLOW_DATABASE_URL", "postgres://x", "sqlite:///", id="database"
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
