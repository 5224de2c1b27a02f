"""A notification's canonical JSON and workflow id stay what they have been.

The workflow id folds Mirror's resends into one run, and an intake log left
by one version is forwarded by the next: an id that changed between
versions would start a second run for a notification already handled.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from workflows.models import Notification, UserAction, canonical_json, workflow_id_for

_text = st.text(min_size=1, max_size=40)
_actions = st.builds(UserAction, type=_text, payload=st.none() | st.text(max_size=40))
_notifications = st.builds(
    Notification,
    collection=_text,
    item_id=_text,
    operation=_text,
    user_token=_text,
    verify_token_sha256=st.none()
    | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    user_actions=st.lists(_actions, max_size=4).map(tuple),
)


@given(_notifications)
def test_canonical_json_is_the_sorted_compact_dump_of_the_model(
    notification: Notification,
) -> None:
    reference = json.dumps(
        notification.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
    )

    assert canonical_json(notification) == reference
    assert Notification.model_validate_json(reference) == notification


def test_workflow_ids_are_those_of_earlier_versions() -> None:
    shared = Notification(
        collection="timeline",
        item_id="item-1",
        operation="UPDATE",
        user_token="alice",
        verify_token_sha256="ab" * 32,
        user_actions=(
            UserAction(type="SHARE"),
            UserAction(type="CUSTOM", payload='pin "é"'),
        ),
    )
    moved = Notification(
        collection="locations", item_id="latest", operation="UPDATE", user_token="bob"
    )

    assert workflow_id_for(shared) == "mirror-timeline-e5bc61a86618d68809ce05c2671bfd0f"
    assert workflow_id_for(moved) == "mirror-locations-2ed66d08ce60faebfdeea25431b8791b"
