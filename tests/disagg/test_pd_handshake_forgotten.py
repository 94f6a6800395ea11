"""A prefill worker that no longer holds decode's KV handshake while decode's connection
stays up answers its next page list 'page list before handshake' (seen in the chaos soak:
with NIXL, a prefill worker's probe found no route to a decode worker stopped for 6 s and
took it for lost, and the resumed decode worker never saw its connection drop). Decode
then handshakes again and sends the page list again: it failed that room and, still taking
its handshake for accepted, every later one with a 500 (30 requests over 22 s in the soak).
A real engine and decode hooks; the prefill worker is a real transport the test plays."""

from __future__ import annotations

import time

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import Inbound
from tests.disagg.test_decode_queue_redirect import (
    decode_hooks,
    play_prefill,
    prefill_side,
    request,
)

FORGOTTEN = m.RoomStatus(
    room=1, ok=False, error="page list before handshake", handshake_needed=True
)


def test_decode_handshakes_again_and_resends_the_page_list_prefill_refused() -> None:
    hooks = decode_hooks()
    prefill = prefill_side(hooks.transport.page_nbytes)
    seen: list[object] = []
    outputs = []

    def forget(event: Inbound) -> None:
        if isinstance(event.msg, m.PageList) and len(seen) == 2:
            prefill.send(event.peer, FORGOTTEN)  # as if it took decode for lost

    def until(cond, what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, f"never: {what}; saw {seen}, {outputs}"
            play_prefill(hooks, prefill, time.monotonic(), seen, outputs, forget)

    def count(kind: type) -> int:
        return sum(isinstance(x, kind) for x in seen)

    try:
        outputs += hooks.on_generate(request(1, prefill.endpoint))
        until(lambda: count(m.PageList) == 2, "the page list sent again")
        assert [type(x) for x in seen] == [m.Handshake, m.PageList, m.Handshake, m.PageList]
        assert seen[1] == seen[3]  # the same pages for the same room
        assert outputs == [] and 1 in hooks.reserved  # the room waits for its KV, not failed
    finally:
        hooks.close()
        prefill.close()
