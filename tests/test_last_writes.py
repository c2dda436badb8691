"""A run's last writes: made together as the workflow returns, never lost, never raised."""

from __future__ import annotations

import asyncio

import pytest

from runners_orchestrator.last_writes import collect_last_writes, write_last


async def test_outside_a_workflow_a_write_is_made_where_it_is_asked_for():
    done: list[str] = []

    async def write() -> None:
        done.append("written")

    await write_last(write())
    assert done == ["written"]


async def test_inside_the_writes_run_together_and_all_are_waited_for_on_the_way_out():
    first_started = asyncio.Event()
    done: list[str] = []

    async def first() -> None:
        first_started.set()
        await asyncio.sleep(0.05)
        done.append("first")

    async def second() -> None:
        # Only reachable if the first write is under way while this one runs: together.
        await asyncio.wait_for(first_started.wait(), 5)
        done.append("second")

    async with collect_last_writes():
        await write_last(first())
        await write_last(second())
        assert done == []  # started, not waited for
    assert sorted(done) == ["first", "second"]


async def test_writes_are_waited_for_when_the_workflow_raises_and_a_failed_one_is_not_raised():
    done: list[str] = []

    async def failing() -> None:
        msg = "Prefect said no"
        raise RuntimeError(msg)

    async def checkpoint() -> None:
        await asyncio.sleep(0.01)
        done.append("checkpoint")

    async def workflow() -> None:
        async with collect_last_writes():
            await write_last(failing())
            await write_last(checkpoint())
            msg = "the workflow's own error"
            raise ValueError(msg)

    with pytest.raises(ValueError, match="the workflow's own error"):
        await workflow()
    assert done == ["checkpoint"]
