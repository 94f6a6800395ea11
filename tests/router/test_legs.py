"""`unless_failed`: decode's leg is stopped the moment prefill's leg fails (pure asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.body import new_rids
from pdserve.router.legs import unless_failed


async def _fail_after(delay_s: float, exc: BaseException) -> None:
    await asyncio.sleep(delay_s)
    raise exc


async def _value_after(delay_s: float, value: str, started: list[str] | None = None) -> str:
    if started is not None:
        started.append(value)
    await asyncio.sleep(delay_s)
    return value


def test_watch_failing_first_cancels_main_and_raises_its_error() -> None:
    async def scenario() -> None:
        watch = asyncio.ensure_future(_fail_after(0.0, ValueError("prefill broke")))
        with pytest.raises(ValueError, match="prefill broke"):
            await unless_failed(_value_after(30.0, "decode"), watch)

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


def test_main_answer_wins_over_a_running_or_cancelled_watch() -> None:
    async def scenario() -> None:
        slow = asyncio.ensure_future(_fail_after(30.0, ValueError("late")))
        assert await unless_failed(_value_after(0.0, "answer"), slow) == "answer"
        slow.cancel()
        assert await unless_failed(_value_after(0.0, "again"), slow) == "again"
        assert await unless_failed(_value_after(0.0, "plain"), None) == "plain"

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


def test_main_never_starts_when_the_watch_already_failed() -> None:
    async def scenario() -> None:
        watch = asyncio.ensure_future(_fail_after(0.0, ValueError("gone")))
        await asyncio.gather(watch, return_exceptions=True)
        started: list[str] = []
        with pytest.raises(ValueError, match="gone"):
            await unless_failed(_value_after(0.0, "decode", started), watch)
        assert started == []

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


def test_main_failure_is_raised_and_caller_cancellation_reaches_main() -> None:
    async def scenario() -> None:
        watch = asyncio.ensure_future(_value_after(30.0, "prefill"))
        with pytest.raises(KeyError):
            await unless_failed(_fail_after(0.0, KeyError("decode broke")), watch)
        started: list[str] = []
        main = _value_after(30.0, "decode", started)
        outer = asyncio.ensure_future(unless_failed(main, watch))
        while not started:
            await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert main.cr_frame is None  # the leg's coroutine ended (cancelled), not leaked
        watch.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


def test_rids_are_unique() -> None:
    rids = [new_rids(None) for _ in range(1000)] + new_rids(1000)
    assert len(set(rids)) == 2000 and all(r.startswith("pdr-") for r in rids)
