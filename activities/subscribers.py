"""Keep each subscriber's OAuth credentials and verify token digest in SQLite.

A subscriber is one Glass user who granted mirrorflow access: the user token
mirrorflow chose when it subscribed that user on Mirror, the user's OAuth
credentials in Google's ``authorized_user`` JSON format, and the SHA-256
digest of the verify token Mirror echoes on every notification. The token
itself is shown once, when the subscriber is added, and never stored.

The database file is created readable and writable by its owner only.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mirrorflow.errors import SubscriberError, UnknownSubscriber
from mirrorflow.files import create_owner_only

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscribers (
    user_token TEXT PRIMARY KEY,
    credentials TEXT NOT NULL,
    verify_token_sha256 TEXT,
    subscription_id TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Subscriber:
    """One Glass user whose notifications mirrorflow accepts."""

    user_token: str
    credentials: Mapping[str, Any] = field(repr=False)
    verify_token_sha256: str | None = field(repr=False)
    subscription_id: str | None = None
    created: datetime | None = None

    def accepts(self, verify_token_sha256: str | None) -> bool:
        """Return whether a notification's verify token digest is this user's.

        The comparison takes the same time wherever the digests differ. A
        subscriber registered without a verify token accepts only
        notifications that carry none.
        """
        expected = self.verify_token_sha256 or ""
        given = verify_token_sha256 or ""

        return hmac.compare_digest(expected.encode(), given.encode())


class SubscriberStore:
    """Subscribers in one SQLite file, safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._create()

    def __repr__(self) -> str:
        return f"SubscriberStore({str(self.path)!r})"

    def _create(self) -> None:
        # Owner-only before SQLite opens it, so no other user can ever read
        # the credentials it will hold.
        create_owner_only(self.path)

        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = sqlite3.connect(self.path, timeout=10)
            try:
                with db:
                    yield db
            finally:
                db.close()

    def add(
        self,
        user_token: str,
        credentials: Mapping[str, Any],
        *,
        verify_token_sha256: str | None,
        subscription_id: str | None = None,
    ) -> Subscriber:
        """Add a subscriber, or replace the one with the same user token."""
        if not user_token:
            raise SubscriberError("A subscriber needs a non-empty user token.")
        if credentials.get("type") != "authorized_user":
            raise SubscriberError(
                f"Credentials for {user_token!r} have type "
                f"{credentials.get('type')!r}; expected 'authorized_user' "
                "(the JSON that google-auth writes for a user's grant)."
            )

        now = datetime.now(UTC).isoformat()
        with self._connect() as db:
            db.execute(
                "INSERT INTO subscribers VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(user_token) DO UPDATE SET credentials=excluded."
                "credentials, verify_token_sha256=excluded.verify_token_sha256, "
                "subscription_id=excluded.subscription_id, updated=excluded.updated",
                (
                    user_token,
                    json.dumps(dict(credentials)),
                    verify_token_sha256,
                    subscription_id,
                    now,
                    now,
                ),
            )

        return self.get(user_token)

    def get(self, user_token: str) -> Subscriber:
        """Return the subscriber of a user token.

        Raises:
            UnknownSubscriber: no subscriber has that user token.
        """
        subscriber = self.find(user_token)
        if subscriber is None:
            raise UnknownSubscriber(
                f"No subscriber has user token {user_token!r}; add one with "
                "`mirrorflow subscribers add`."
            )

        return subscriber

    def find(self, user_token: str) -> Subscriber | None:
        """Return the subscriber of a user token, or None."""
        with self._connect() as db:
            row = db.execute(
                "SELECT user_token, credentials, verify_token_sha256, "
                "subscription_id, created FROM subscribers WHERE user_token = ?",
                (user_token,),
            ).fetchone()

        return None if row is None else _subscriber(row)

    def list(self) -> list[Subscriber]:
        """Return every subscriber, ordered by user token."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT user_token, credentials, verify_token_sha256, "
                "subscription_id, created FROM subscribers ORDER BY user_token"
            ).fetchall()

        return [_subscriber(row) for row in rows]

    def remove(self, user_token: str) -> bool:
        """Remove a subscriber; return whether there was one."""
        with self._connect() as db:
            cursor = db.execute(
                "DELETE FROM subscribers WHERE user_token = ?", (user_token,)
            )

        return cursor.rowcount > 0

    def save_credentials(self, user_token: str, credentials: Mapping[str, Any]) -> None:
        """Write back credentials that the client refreshed."""
        with self._connect() as db:
            db.execute(
                "UPDATE subscribers SET credentials = ?, updated = ? "
                "WHERE user_token = ?",
                (
                    json.dumps(dict(credentials)),
                    datetime.now(UTC).isoformat(),
                    user_token,
                ),
            )


def _subscriber(row: tuple[Any, ...]) -> Subscriber:
    user_token, credentials, digest, subscription_id, created = row

    return Subscriber(
        user_token=user_token,
        credentials=json.loads(credentials),
        verify_token_sha256=digest,
        subscription_id=subscription_id,
        created=datetime.fromisoformat(created),
    )
