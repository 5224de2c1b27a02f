"""Check that a notification comes from a known subscriber, cheaply.

This check only keeps forged pings from starting workflows; the workflow's
verify step stays authoritative. Subscribers found in the database are kept
in memory for a few seconds. Anything the cache cannot accept (an unknown
user token, a digest that differs from the cached one) is looked up again, so
a subscriber added or given a new verify token a moment ago is accepted at
once. The lookup runs in a worker thread so that SQLite never blocks the
event loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from enum import StrEnum

import anyio.to_thread

from activities.subscribers import Subscriber, SubscriberStore

CACHE_SECONDS = 10.0
"""How long a subscriber found in the database is trusted without a lookup."""


class Verdict(StrEnum):
    """What the webhook concluded about a notification's sender."""

    ACCEPTED = "accepted"
    UNKNOWN_SENDER = "unknown_sender"
    DIGEST_MISMATCH = "wrong_verify_token"


class SenderCheck:
    """Accept notifications whose user token and verify token digest match."""

    def __init__(
        self,
        store: SubscriberStore,
        *,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._clock = clock
        # Only subscribers that exist are cached, so the cache is no larger
        # than the subscribers table however many forged tokens arrive.
        self._cache: dict[str, tuple[float, Subscriber]] = {}

    def __repr__(self) -> str:
        return f"SenderCheck({self._store!r}, cache_seconds={self._cache_seconds:g})"

    async def check(self, user_token: str, verify_token_sha256: str | None) -> Verdict:
        """Return whether the sender is the subscriber it claims to be.

        Raises:
            sqlite3.Error: the subscribers database could not be read.
        """
        now = self._clock()
        cached = self._cache.get(user_token)
        if cached is not None:
            expires, subscriber = cached
            if expires > now and subscriber.accepts(verify_token_sha256):
                return Verdict.ACCEPTED

        found = await anyio.to_thread.run_sync(
            self._store.find, user_token, abandon_on_cancel=True
        )
        if found is None:
            self._cache.pop(user_token, None)
            return Verdict.UNKNOWN_SENDER

        # Keep the digest only; the webhook has no use for the credentials.
        subscriber = dataclasses.replace(found, credentials={})
        self._cache[user_token] = (now + self._cache_seconds, subscriber)
        if not subscriber.accepts(verify_token_sha256):
            return Verdict.DIGEST_MISMATCH

        return Verdict.ACCEPTED
