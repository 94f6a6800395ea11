"""The generator's wait for a request's outputs: messages already queued are taken without
a waiting task, and the request deadline and error messages hold on that path too."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from pdserve.serving.generation import Generator
from pdserve.serving.hooks import RequestError
from pdserve.serving.protocol import ReqOutput


def _outputs(queued: list[ReqOutput], started_at: float, timeout_s: float = 30.0):
    generator = object.__new__(Generator)
    generator.request_timeout_s = timeout_s
    flight = SimpleNamespace(outputs=asyncio.Queue())
    for msg in queued:
        flight.outputs.put_nowait(msg)
    return generator._outputs(flight, SimpleNamespace(started_at=started_at)), flight.outputs


async def _take(gen, n: int) -> list[ReqOutput]:
    return [await anext(gen) for _ in range(n)]


def test_queued_outputs_come_in_order_then_the_error_of_a_failed_message():
    queued = [ReqOutput(rid="r", new_token_ids=[i]) for i in range(3)]
    queued.append(ReqOutput(rid="r", error_status=503, error_message="worker gone"))

    async def main() -> None:
        gen, _ = _outputs(queued, time.monotonic())
        assert [m.new_token_ids for m in await _take(gen, 3)] == [[0], [1], [2]]
        with pytest.raises(RequestError) as exc:
            await anext(gen)
        assert (exc.value.status, exc.value.message) == (503, "worker gone")

    asyncio.run(main())


def test_the_deadline_holds_while_outputs_keep_arriving():
    queued = [ReqOutput(rid="r", new_token_ids=[1])]

    async def main() -> None:
        gen, _ = _outputs(queued, time.monotonic() - 60.0)  # its deadline has passed
        with pytest.raises(RequestError) as exc:
            await anext(gen)
        assert exc.value.status == 504

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
