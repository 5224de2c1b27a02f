"""The webhook's deadlines: one sweeping task cancels what runs too long."""

from __future__ import annotations

import asyncio

import pytest

from webhook.deadlines import TICK, Deadlines


async def _sleeper(deadlines: Deadlines, seconds: float, deadline: float) -> str:
    deadlines.set(deadline)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if not deadlines.expired():
            raise
        return "expired"
    finally:
        deadlines.clear()

    return "finished"


async def test_a_task_past_its_deadline_is_cancelled_and_told_so() -> None:
    deadlines = Deadlines()

    outcomes = await asyncio.gather(
        _sleeper(deadlines, 30, deadline=0.2),
        _sleeper(deadlines, 0.05, deadline=0.2),
    )

    assert list(outcomes) == ["expired", "finished"]


async def test_a_moved_deadline_is_the_one_kept() -> None:
    deadlines = Deadlines()

    async def moved() -> str:
        deadlines.set(0.1)
        deadlines.set(30)
        try:
            await asyncio.sleep(3 * TICK)
        finally:
            deadlines.clear()
        return "finished"

    assert await moved() == "finished"


async def test_a_task_cancelled_by_someone_else_is_not_expired() -> None:
    deadlines = Deadlines()
    task = asyncio.create_task(_sleeper(deadlines, 30, deadline=30))
    await asyncio.sleep(0)

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert repr(deadlines) == "Deadlines(pending=0)"
