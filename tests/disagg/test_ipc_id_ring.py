"""cuda_ipc's id ring (ipc_grants.IdRing) on the CPU: page ids too long for a completion
slot go into a ring of host memory the copy kernel reads in place. A stretch is never
handed out again while its copy may still read it, wrapping included, and a full ring
says so (the caller then uploads the ids) instead of waiting."""

from __future__ import annotations

import random

import numpy as np

from pdserve.disagg.transfer.ipc_grants import IdRing


class Copies:
    """Copies queued in order; the test says how many have run."""

    def __init__(self) -> None:
        self.queued = 0
        self.ran = 0

    def next(self):
        n = self.queued
        self.queued += 1
        return lambda: self.ran > n


def ids(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(start, start + n, dtype=np.int32), np.arange(
        -start - n, -start, dtype=np.int32
    )


def test_ids_land_at_the_index_given_sources_then_destinations():
    ring, copies = IdRing(np.zeros(32, dtype=np.int32)), Copies()
    src, dst = ids(100, 5)
    at = ring.put(src, dst, copies.next())
    assert at == 0
    assert ring.words[at : at + 5].tolist() == src.tolist()
    assert ring.words[at + 5 : at + 10].tolist() == dst.tolist()
    at2 = ring.put(*ids(200, 3), copies.next())
    assert at2 == 10  # after the first, which may still be read


def test_a_stretch_is_not_reused_until_its_copy_ran_and_a_full_ring_waits_for_nobody():
    ring, copies = IdRing(np.zeros(20, dtype=np.int32)), Copies()
    assert ring.put(*ids(0, 4), copies.next()) == 0  # [0, 8)
    assert ring.put(*ids(10, 4), copies.next()) == 8  # [8, 16)
    assert ring.put(*ids(20, 3), copies.next()) is None  # 4 left at the end, 0 at the start
    before = ring.words.copy()
    assert ring.put(*ids(20, 3), copies.next()) is None
    assert np.array_equal(ring.words, before)  # a refused put writes nothing
    copies.ran = 1  # the first copy ran: [0, 8) is free, the ids wrap there
    assert ring.put(*ids(30, 3), copies.next()) == 0
    assert ring.words[8:16].tolist() == [*range(10, 14), *range(-14, -10)]  # second intact
    assert ring.put(*ids(40, 2), copies.next()) is None  # wrapped: only [6, 8) free
    assert ring.put(*ids(50, 1), copies.next()) == 6
    assert ring.put(*ids(60, 1), copies.next()) is None  # full
    copies.ran = copies.queued  # all ran: the ring starts over
    assert ring.put(*ids(70, 2), copies.next()) == 0


def test_a_list_longer_than_the_ring_is_refused():
    ring, copies = IdRing(np.zeros(8, dtype=np.int32)), Copies()
    assert ring.put(*ids(0, 5), copies.next()) is None
    assert ring.put(*ids(0, 4), copies.next()) == 0


def test_random_traffic_never_overwrites_ids_a_copy_may_still_read():
    rng = random.Random(7)
    ring, copies = IdRing(np.zeros(64, dtype=np.int32)), Copies()
    live: list[tuple[int, np.ndarray, np.ndarray, object]] = []  # (at, src, dst, copied)
    placed = refused = 0
    for step in range(5000):
        copies.ran = min(copies.queued, copies.ran + rng.randint(0, 3))  # in queue order
        live = [entry for entry in live if not entry[3]()]
        n = rng.randint(1, 20)
        src, dst = ids(1000 * step, n)
        copied = copies.next()
        at = ring.put(src, dst, copied)
        if at is None:
            refused += 1
        else:
            placed += 1
            assert 0 <= at and at + 2 * n <= ring.words.size
            live.append((at, src, dst, copied))
        for at, src, dst, _ in live:
            assert np.array_equal(ring.words[at : at + src.size], src)
            assert np.array_equal(ring.words[at + src.size : at + 2 * src.size], dst)
    assert placed > 1000 and refused > 100  # both paths taken, wraps included
