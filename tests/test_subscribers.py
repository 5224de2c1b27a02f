"""The subscriber store keeps credentials owner-only and compares digests."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from activities.subscribers import SubscriberStore
from mirrorflow.errors import SubscriberError, UnknownSubscriber
from workflows.models import sha256_hex

CREDENTIALS = {
    "type": "authorized_user",
    "client_id": "client",
    "client_secret": "client-secret",
    "refresh_token": "refresh-secret",
    "token_uri": "http://127.0.0.1:1/token",
}


def test_store_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "subscribers.db"

    SubscriberStore(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_store_adds_lists_and_removes(tmp_path: Path) -> None:
    store = SubscriberStore(tmp_path / "subscribers.db")

    store.add("alice", CREDENTIALS, verify_token_sha256=sha256_hex("t"))
    store.add("bob", CREDENTIALS, verify_token_sha256=None)
    names = [subscriber.user_token for subscriber in store.list()]
    removed = store.remove("alice")

    assert names == ["alice", "bob"]
    assert removed
    assert store.find("alice") is None
    assert not store.remove("alice")


def test_store_get_unknown_names_the_token(tmp_path: Path) -> None:
    store = SubscriberStore(tmp_path / "subscribers.db")

    with pytest.raises(UnknownSubscriber, match="'nobody'"):
        store.get("nobody")


def test_store_refuses_credentials_of_another_type(tmp_path: Path) -> None:
    store = SubscriberStore(tmp_path / "subscribers.db")

    with pytest.raises(SubscriberError, match="'service_account'"):
        store.add("alice", {"type": "service_account"}, verify_token_sha256=None)


def test_subscriber_accepts_only_its_verify_token(tmp_path: Path) -> None:
    store = SubscriberStore(tmp_path / "subscribers.db")
    with_token = store.add("alice", CREDENTIALS, verify_token_sha256=sha256_hex("t"))
    without = store.add("bob", CREDENTIALS, verify_token_sha256=None)

    assert with_token.accepts(sha256_hex("t"))
    assert not with_token.accepts(sha256_hex("guess"))
    assert not with_token.accepts(None)
    assert without.accepts(None)
    assert not without.accepts(sha256_hex("t"))


def test_subscriber_repr_hides_credentials(tmp_path: Path) -> None:
    store = SubscriberStore(tmp_path / "subscribers.db")

    subscriber = store.add("alice", CREDENTIALS, verify_token_sha256=sha256_hex("t"))

    assert "refresh-secret" not in repr(subscriber)
    assert sha256_hex("t") not in repr(subscriber)


def test_store_saves_refreshed_credentials(tmp_path: Path) -> None:
    store = SubscriberStore(tmp_path / "subscribers.db")
    store.add("alice", CREDENTIALS, verify_token_sha256=None)

    store.save_credentials("alice", {**CREDENTIALS, "token": "new-access"})

    assert store.get("alice").credentials["token"] == "new-access"
