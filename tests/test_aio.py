"""`pdserve.aio.wait_for`: a timeout that never loses its caller's cancellation. Each case is
driven step by step on one loop, so the moment of the cancellation is exact."""

from __future__ import annotations

import asyncio
import functools

import pytest

from pdserve import aio


async def _until_waiting(task: asyncio.Task) -> None:
    """Run the loop until `task` is parked on a future (it started and awaits)."""
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()


def test_wait_for_raises_cancelled_when_the_awaited_finished_with_the_cancel():
    """Python < 3.12's asyncio.wait_for returns the result here and the caller goes on as if
    never cancelled (a router leg cancelled as its connection opened sent its request)."""
    dropped: list[str] = []

    async def main() -> None:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(aio.wait_for(fut, 30, dropped.append))
        await _until_waiting(task)
        fut.set_result("connection")  # the awaited finishes ...
        task.cancel()  # ... in the same step as the caller is cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # the dropped result is handed over by a done callback

    asyncio.run(main())
    assert dropped == ["connection"]


def test_wait_for_returns_the_result_and_stops_the_awaited_on_timeout():
    finished: list[bool] = []
    slow = functools.partial(_wait_forever, finished)

    async def main() -> None:
        assert await aio.wait_for(asyncio.sleep(0, "x"), 30) == "x"
        with pytest.raises(asyncio.TimeoutError):
            await aio.wait_for(slow(), 0.01)
        assert finished == [True]  # ended before wait_for returned
        with pytest.raises(ValueError):
            await aio.wait_for(_fail(), 30)

    asyncio.run(main())


async def _wait_forever(finished: list[bool]) -> None:
    """Waits until cancelled, then notes that it ended."""
    try:
        await asyncio.Event().wait()
    finally:
        finished.append(True)


async def _fail() -> None:
    raise ValueError("boom")


def test_wait_for_cancelled_while_waiting_cancels_the_awaited():
    finished: list[bool] = []
    slow = functools.partial(_wait_forever, finished)

    async def main() -> None:
        task = asyncio.create_task(aio.wait_for(slow(), 30))
        await _until_waiting(task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [True]

    asyncio.run(main())
