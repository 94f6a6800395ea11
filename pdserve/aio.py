"""`wait_for`: asyncio.wait_for without its lost cancellation. Nothing PD specific; used in
every process that runs an asyncio loop (router, servers' front ends).

Python before 3.12 runs `asyncio.wait_for` in a second task, and when the caller is
cancelled just as that task finishes, returns its result instead of raising: the caller goes
on as if never cancelled. A router leg cancelled as its connection opened then sent its
request anyway and waited for an answer nobody wanted (a prefill room kept its KV pages until
the bootstrap deadline); a server handler cancelled by its client's hang-up went on serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(
    aw: Awaitable[T], timeout_s: float, on_dropped: Callable[[T], None] | None = None
) -> T:
    """`aw`'s result, or asyncio.TimeoutError after `timeout_s`. A caller cancelled meanwhile
    always gets CancelledError. Either way `aw` is stopped and has ended when this returns;
    a result it produced anyway (it finished as the caller gave up) goes to `on_dropped`,
    e.g. to close a connection that nobody will use."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
    except BaseException:
        await _stop(task, on_dropped)
        raise
    if not done:
        await _stop(task, on_dropped)
        raise asyncio.TimeoutError
    return task.result()


async def _stop(task: asyncio.Future[T], on_dropped: Callable[[T], None] | None) -> None:
    def settle(done: asyncio.Future[T]) -> None:
        if done.cancelled() or done.exception() is not None:  # retrieved: no warning
            return
        if on_dropped is not None:
            on_dropped(done.result())

    task.add_done_callback(settle)
    task.cancel()
    # Not running once we return (bpo-32751), unless our caller is cancelled again meanwhile.
    await asyncio.wait((task,))
