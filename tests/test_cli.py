"""The ``mirrorflow`` command as an operator types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from activities.subscribers import SubscriberStore
from emulator.testing import EmulatorAdmin, EmulatorUser
from workflows.models import sha256_hex

CALLBACK = "http://127.0.0.1:9/notify"


def mirrorflow(
    *args: str, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the command with these settings; return what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "mirrorflow", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def settings_env(emulator: EmulatorAdmin, tmp_path: Path) -> dict[str, str]:
    """Return the variables that point the command at the emulator."""
    return {
        "MIRRORFLOW_MIRROR_ROOT_URL": emulator.root_url,
        "MIRRORFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'subscribers.db'}",
        "MIRRORFLOW_CALLBACK_URL": CALLBACK,
        "MIRRORFLOW_LOG_LEVEL": "WARNING",
    }


def test_subscribers_add_list_remove(
    emulator: EmulatorAdmin, mirror_user: EmulatorUser, tmp_path: Path
) -> None:
    env = settings_env(emulator, tmp_path)
    credentials = tmp_path / "alice.json"
    credentials.write_text(json.dumps(mirror_user.credentials))

    added = mirrorflow(
        "subscribers", "add", "--user-token", "alice", "--credentials",
        str(credentials), env=env,
    )  # fmt: skip
    subscriptions = emulator.subscriptions(mirror_user)
    listed = mirrorflow("subscribers", "list", env=env)
    stored = SubscriberStore(tmp_path / "subscribers.db").get("alice")
    removed = mirrorflow("subscribers", "remove", "--user-token", "alice", env=env)

    assert "Subscribed 'alice'" in added.stdout
    assert sorted(s["collection"] for s in subscriptions) == ["locations", "timeline"]
    assert {s["callbackUrl"] for s in subscriptions} == {CALLBACK}
    assert {s["userToken"] for s in subscriptions} == {"alice"}
    [verify_token] = {s["verifyToken"] for s in subscriptions}
    assert stored.accepts(sha256_hex(verify_token))
    assert verify_token not in added.stdout + added.stderr
    assert listed.stdout.startswith("alice\t")
    assert "Removed 'alice'" in removed.stdout
    assert emulator.subscriptions(mirror_user) == []


def test_subscribers_add_names_an_unreadable_credentials_file(
    emulator: EmulatorAdmin, tmp_path: Path
) -> None:
    env = settings_env(emulator, tmp_path)
    missing = tmp_path / "missing.json"

    result = mirrorflow(
        "subscribers", "add", "--user-token", "bob", "--credentials", str(missing),
        env=env, check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "authorized_user" in result.stderr


def test_wrong_setting_stops_with_the_variable_named(tmp_path: Path) -> None:
    env = {"MIRRORFLOW_STORAGE_URL": "ftp://nowhere"}

    result = mirrorflow("subscribers", "list", env=env, check=False)

    assert result.returncode == 2
    assert "MIRRORFLOW_STORAGE_URL" in result.stderr
    assert "'ftp://nowhere'" in result.stderr
