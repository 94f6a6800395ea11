"""A prefill worker's answers to decode's leases (`RoomsQueued`, docs/protocol.md 5.2) for
rooms its front end dispatched to another worker (section 10). A real engine (tiny-random)
and real transports over loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import Inbound
from pdserve.serving.protocol import RoomForwarded
from tests.disagg.test_prefill_worker_gate import Pair
from tests.disagg.transfer_peer import worker_turn

ROOM = 9
TARGET = RoomForwarded(room=ROOM, dp_rank=1, kv_endpoint="tcp://127.0.0.1:9")


@pytest.fixture
def home() -> Iterator[Pair]:
    pair = Pair(num_pages=8)
    try:
        yield pair
    finally:
        pair.close()


def _turn_until_redirect(pair: Pair) -> m.Redirect:
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, "no redirect came"
        worker_turn(pair.engine, pair.hooks)
        for event in pair.decode.poll(5):
            if isinstance(event, Inbound) and isinstance(event.msg, m.Redirect):
                return event.msg


def test_a_page_list_sent_before_a_leases_redirect_came_back_is_redirected_too(home):
    """Decode leased a queued room to its home worker, which answered with a Redirect; the
    room left decode's queue before that came back, so its page list went home too. The home
    worker had used its forward entry for the lease and kept that page list as a room waiting
    for a request that never comes: a phantom room until --bootstrap-timeout-s (30 s)."""
    home.hooks.on_room_forwarded(TARGET)
    home.page_list(ROOM + 1, [0])  # handshakes; another room, listed here as usual
    home.decode.send(home.peer, m.RoomsQueued(rooms=[ROOM]))
    first = _turn_until_redirect(home)
    home.page_list(ROOM, [1, 2])
    second = _turn_until_redirect(home)
    for redirect in (first, second):
        assert (redirect.room, redirect.dp_rank, redirect.kv_endpoint) == (
            ROOM,
            1,
            TARGET.kv_endpoint,
        )
    assert ROOM not in home.hooks.rooms


def test_a_lease_that_came_before_the_forward_notice_is_redirected_when_it_comes(home):
    """The front end's notice that a room went to another worker and decode's first lease
    for it race; a lease that came first was ignored, and decode learnt where the room went
    only from its next lease, a quarter of --bootstrap-timeout-s later (a quarter of the
    room's deadline on the worker that holds it)."""
    home.page_list(ROOM + 1, [0])  # handshakes
    home.decode.send(home.peer, m.RoomsQueued(rooms=[ROOM]))
    deadline = time.monotonic() + 10
    while ROOM not in home.hooks.forwards._leased:
        assert time.monotonic() < deadline, "the lease never came"
        worker_turn(home.engine, home.hooks)
    home.hooks.on_room_forwarded(TARGET)  # no second lease
    redirect = _turn_until_redirect(home)
    assert (redirect.room, redirect.dp_rank, redirect.kv_endpoint) == (
        ROOM,
        1,
        TARGET.kv_endpoint,
    )
