"""Recorded histories of every outcome replay against today's workflow code.

A change to ``NotificationWorkflow`` that would break runs already in flight
(a different sequence of activities, timers or search attribute updates)
fails here. When a change is deliberate, version it with ``workflow.patched``;
record fresh histories with ``MIRRORFLOW_RECORD_HISTORIES=1 pytest
tests/test_pipeline.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from mirrorflow.temporal import DATA_CONVERTER
from workflows import NotificationWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
OUTCOMES = ["stored", "removed", "rejected", "gone", "ignored", "revoked"]


def test_histories_cover_every_outcome() -> None:
    names = [path.stem for path in HISTORIES]

    for outcome in OUTCOMES:
        assert any(name.startswith(outcome) for name in names), outcome


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[NotificationWorkflow], data_converter=DATA_CONVERTER)

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, result.replay_failure
