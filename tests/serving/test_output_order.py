"""The generator's output plumbing in one process: a request's deadline as a queued 504,
and `merged` handing each delta over with its item's state as that delta left it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from pdserve.serving.generation import Generator, ItemResult, merged
from pdserve.serving.hooks import RequestError
from pdserve.serving.protocol import ReqOutput


def _outputs(queued: list[ReqOutput], started_at: float, timeout_s: float = 30.0):
    generator = object.__new__(Generator)
    generator.request_timeout_s = timeout_s
    flight = SimpleNamespace(req=SimpleNamespace(rid="r"), outputs=asyncio.Queue())
    for msg in queued:
        flight.outputs.put_nowait(msg)
    return generator._outputs(flight, SimpleNamespace(started_at=started_at)), flight.outputs


def test_queued_outputs_come_in_order_then_the_error_of_a_failed_message():
    queued = [ReqOutput(rid="r", new_token_ids=[i]) for i in range(3)]
    queued.append(ReqOutput(rid="r", error_status=503, error_message="worker gone"))

    async def main() -> None:
        gen, _ = _outputs(queued, time.monotonic())
        assert [(await anext(gen)).new_token_ids for _ in range(3)] == [[0], [1], [2]]
        with pytest.raises(RequestError) as exc:
            await anext(gen)
        assert (exc.value.status, exc.value.message) == (503, "worker gone")

    asyncio.run(main())


def test_a_passed_deadline_ends_the_request_with_504_and_its_timer_is_cancelled():
    async def main() -> None:
        gen, _ = _outputs([ReqOutput(rid="r", new_token_ids=[1])], time.monotonic() - 60.0)
        assert (await anext(gen)).new_token_ids == [1]  # already there when it expired
        with pytest.raises(RequestError) as exc:
            await anext(gen)
        assert exc.value.status == 504 and "timed out after 30 s" in exc.value.message
        # Due at the next loop turn, but the request ends first: no 504 is queued for it.
        gen, outputs = _outputs([ReqOutput(rid="r", new_token_ids=[2])], time.monotonic(), 0.0)
        await anext(gen)
        await gen.aclose()
        for _ in range(3):
            await asyncio.sleep(0)  # loop turns in which an uncancelled timer would fire
        assert outputs.empty()

    asyncio.run(main())


def test_an_output_that_comes_later_is_waited_for():
    async def main() -> None:
        gen, outputs = _outputs([], time.monotonic())
        waiting = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0)  # one loop turn: the generator now waits on the empty queue
        assert not waiting.done()
        outputs.put_nowait(ReqOutput(rid="r", new_token_ids=[7]))
        assert (await waiting).new_token_ids == [7]

    asyncio.run(main())


class _Counting:
    """Stands in for a Generator whose outputs are all queued already: each item's `run`
    applies its next delta to the item's result without suspending."""

    async def run(self, item, result: ItemResult, client_gone=None):
        for k in range(1, 6):
            result.output_ids.append(k)
            yield k


@pytest.mark.parametrize("num_items", [1, 3])
def test_merged_hands_over_each_delta_with_the_state_it_left(num_items):
    async def main() -> list[tuple[int, int, int]]:
        items = [SimpleNamespace(rid=f"r{i}") for i in range(num_items)]
        seen = []
        async for index, result, delta in merged(_Counting(), items):
            seen.append((index, delta, len(result.output_ids)))
            await asyncio.sleep(0)  # a caller that writes each chunk out
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 5 * num_items
    assert all(delta == num_ids for _, delta, num_ids in seen), seen
