"""Subscribe Glass users on Mirror and keep them in the subscribers database."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from activities import mirror
from activities.subscribers import Subscriber, SubscriberStore
from mirrorflow.settings import Settings
from workflows.models import sha256_hex

COLLECTIONS = ("timeline", "locations")


def add_subscriber(
    settings: Settings,
    user_token: str,
    credentials: Mapping[str, Any],
    *,
    collections: Sequence[str] = COLLECTIONS,
) -> Subscriber:
    """Subscribe a user on Mirror with a fresh verify token, then keep them.

    The verify token goes to Mirror once and only its digest is kept: Mirror
    echoes the token on every notification and mirrorflow compares digests.
    Subscriptions the user already had for mirrorflow's callback are replaced.
    """
    store = SubscriberStore(settings.database_path)
    verify_token = secrets.token_urlsafe(32)
    ids = []
    with _service(settings, credentials) as service:
        _unsubscribe(service, settings.callback_url)
        for collection in collections:
            subscription = {
                "collection": collection,
                "callbackUrl": settings.callback_url,
                "userToken": user_token,
                "verifyToken": verify_token,
            }
            created = service.subscriptions().insert(body=subscription).execute()
            ids.append(str(created["id"]))

    return store.add(
        user_token,
        credentials,
        verify_token_sha256=sha256_hex(verify_token),
        subscription_id=",".join(ids),
    )


def remove_subscriber(settings: Settings, user_token: str) -> bool:
    """Unsubscribe a user on Mirror (where still possible) and forget them."""
    store = SubscriberStore(settings.database_path)
    subscriber = store.find(user_token)
    if subscriber is None:
        return False

    try:
        with _service(settings, subscriber.credentials) as service:
            _unsubscribe(service, settings.callback_url)
    except Exception as exc:
        # A revoked grant cannot unsubscribe; Mirror drops its subscriptions.
        if mirror.classify(exc) is not mirror.Failure.REVOKED:
            raise

    return store.remove(user_token)


def _service(settings: Settings, credentials: Mapping[str, Any]) -> Any:
    return mirror.build_mirror(
        mirror.credentials_from_info(credentials),
        root_url=settings.mirror_root_url,
        timeout=settings.mirror_timeout,
    )


def _unsubscribe(service: Any, callback_url: str) -> None:
    listed = service.subscriptions().list().execute()
    for subscription in listed.get("items", []):
        if subscription.get("callbackUrl") == callback_url:
            service.subscriptions().delete(id=subscription["id"]).execute()
