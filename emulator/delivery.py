"""Deliver notifications to subscribers' callback URLs the way Mirror did.

Each notification is POSTed as JSON to its subscription's ``callbackUrl`` in
a background task. Only a ``200`` counts as delivered; any other status, a
timeout or a connection error is followed by another attempt after a wait
that starts at ``delivery_backoff`` seconds and doubles each time, up to
``delivery_attempts`` attempts in all. Every attempt is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from emulator.config import EmulatorConfig
from emulator.resources import Subscription, new_id, now, rfc3339

log = structlog.get_logger("emulator.delivery")

USER_AGENT = "mirrorflow-emulator (Mirror API notification delivery)"


@dataclass(frozen=True)
class Notification:
    """One notification bound for one subscription's callback URL."""

    delivery_id: str
    user_id: str
    subscription_id: str
    callback_url: str
    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Return the notification as the admin API shows it."""
        return {
            "deliveryId": self.delivery_id,
            "userId": self.user_id,
            "subscriptionId": self.subscription_id,
            "callbackUrl": self.callback_url,
            "body": self.body,
        }


def notification_body(
    subscription: Subscription,
    *,
    collection: str,
    item_id: str,
    operation: str,
    user_actions: list[dict[str, str]] | None,
) -> dict[str, Any]:
    """Return the JSON body Mirror POSTed for one change to one subscription."""
    body: dict[str, Any] = {
        "collection": collection,
        "itemId": item_id,
        "operation": operation,
    }
    if subscription.user_token is not None:
        body["userToken"] = subscription.user_token
    if subscription.verify_token is not None:
        body["verifyToken"] = subscription.verify_token
    if user_actions is not None:
        body["userActions"] = user_actions

    return body


class Deliverer:
    """Send notifications in the background and keep a record of every attempt."""

    def __init__(self, config: Callable[[], EmulatorConfig]) -> None:
        self._config = config
        self._attempts: deque[dict[str, Any]] = deque(maxlen=config().record_limit)
        self._numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    @property
    def pending(self) -> int:
        """Return how many notifications are still being delivered."""
        return len(self._tasks)

    def send(
        self,
        user_id: str,
        subscriptions: Iterable[Subscription],
        *,
        collection: str,
        item_id: str,
        operation: str,
        user_actions: list[dict[str, str]] | None = None,
    ) -> list[Notification]:
        """Start delivering one change to every subscription it concerns."""
        notifications = [
            Notification(
                delivery_id=new_id(),
                user_id=user_id,
                subscription_id=subscription.id,
                callback_url=subscription.callback_url,
                body=notification_body(
                    subscription,
                    collection=collection,
                    item_id=item_id,
                    operation=operation,
                    user_actions=user_actions,
                ),
            )
            for subscription in subscriptions
            if subscription.matches(collection, operation)
        ]
        for notification in notifications:
            task = asyncio.create_task(self._deliver(notification))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return notifications

    def attempts(
        self,
        *,
        after: int = 0,
        user_id: str | None = None,
        delivery_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return the recorded attempts numbered above ``after``, oldest first."""
        return [
            attempt
            for attempt in self._attempts
            if attempt["seq"] > after
            and (user_id is None or attempt["userId"] == user_id)
            and (delivery_id is None or attempt["deliveryId"] == delivery_id)
        ]

    def clear(self) -> None:
        """Forget the recorded attempts."""
        self._attempts = deque(maxlen=self._config().record_limit)

    def cancel(self) -> None:
        """Stop every delivery under way, without waiting for them."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Stop every delivery under way and close the HTTP client."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # Environment proxies must not capture loopback callbacks.
            self._client = httpx.AsyncClient(
                trust_env=False, headers={"User-Agent": USER_AGENT}
            )

        return self._client

    async def _deliver(self, notification: Notification) -> None:
        config = self._config()
        for attempt in range(1, config.delivery_attempts + 1):
            delivered = await self._attempt(notification, attempt, config)
            if delivered:
                return
            if attempt < config.delivery_attempts:
                wait = config.delivery_backoff * 2 ** (attempt - 1)
                await asyncio.sleep(min(wait, config.delivery_backoff_max))

        log.warning(
            "notification_abandoned",
            delivery_id=notification.delivery_id,
            callback_url=notification.callback_url,
            attempts=config.delivery_attempts,
        )

    async def _attempt(
        self, notification: Notification, attempt: int, config: EmulatorConfig
    ) -> bool:
        started = now()
        clock = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            response = await self._http().post(
                notification.callback_url,
                json=notification.body,
                timeout=config.delivery_timeout,
            )
            status = response.status_code
        except httpx.TimeoutException as exc:
            error = (
                f"timeout after {config.delivery_timeout:g} s ({type(exc).__name__})"
            )
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"

        delivered = status == 200
        last = attempt >= config.delivery_attempts
        outcome = "delivered" if delivered else "failed" if last else "retrying"
        self._attempts.append(
            {
                "seq": next(self._numbers),
                "deliveryId": notification.delivery_id,
                "userId": notification.user_id,
                "subscriptionId": notification.subscription_id,
                "callbackUrl": notification.callback_url,
                "body": notification.body,
                "attempt": attempt,
                "statusCode": status,
                "error": error,
                "outcome": outcome,
                "started": rfc3339(started),
                "durationMs": round((time.perf_counter() - clock) * 1000, 3),
            }
        )
        log.info(
            "notification_attempt",
            delivery_id=notification.delivery_id,
            callback_url=notification.callback_url,
            attempt=attempt,
            status_code=status,
            error=error,
            outcome=outcome,
        )

        return delivered
