"""cuda_ipc's completion slots and decode-side landings (ipc_flags.py, ipc_landing.py) on the
CPU: the prefill side's writer maps the decode side's memfd through /proc as it does across
processes, and sets flags from the host where a GPU would after its copy. A grant yields
KVReceived + RoomStatus only once its own flag (not an older grant's) is set; a forgotten
room's pages stay held until no write can come."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import ipc_landing
from pdserve.disagg.transfer.base import Inbound, KVReceived, PagesSettled, PeerId
from pdserve.disagg.transfer.ipc_flags import SlotBoard, SlotsFull, SlotWriter
from pdserve.disagg.transfer.ipc_landing import Landings
from pdserve.disagg.transfer.ipc_pool import IpcStatus, encode

PEER = PeerId("tcp://127.0.0.1:1")
PAGE_NBYTES = 64


@pytest.fixture
def side():
    rejected: list[str] = []
    board = SlotBoard(num_slots=4, payload_nbytes=512)
    reject = lambda peer, why: rejected.append(why) or 0  # noqa: E731
    landings = Landings(board, PAGE_NBYTES, reject, Counter())
    pid, fd = board.where
    writer = SlotWriter(pid, fd, board.num_slots, board.payload_nbytes)
    yield landings, writer, rejected
    writer.close()
    landings.close()


def granted(landings: Landings, room: int, pages: list[int], ttl_s: float = 60.0):
    grant = landings.grant(m.PageList(room=room, dst_page_ids=pages, prompt_len=9), ttl_s)
    landings.commit(PEER, grant)
    return grant


def ok(room: int) -> m.RoomStatus:
    return m.RoomStatus(room=room, ok=True, first=m.FirstToken(room=room, token_id=42))


def land(writer: SlotWriter, grant, num_pages: int, status: m.RoomStatus | None) -> None:
    """What prefill's send_kv does: the payload from the host, then the flag."""
    assert writer.write_status(grant.slot, encode(IpcStatus(num_pages=num_pages, status=status)))
    writer.set_flag(grant.slot, grant.seq)


def test_a_set_slot_gives_kv_received_then_the_status_and_frees_the_slot(side):
    landings, writer, _ = side
    grant = granted(landings, 7, [3, 1, 2])
    assert landings.collect() == []
    land(writer, grant, 3, ok(7))
    received, status = landings.collect()
    assert received == KVReceived(PEER, 7, 3, 3 * PAGE_NBYTES, 3) and received.complete
    assert status == Inbound(PEER, ok(7))
    assert landings.collect() == [] and not landings.waiting
    assert landings.forget(7) == []  # landed: nothing to hold
    assert len({landings.grant(m.PageList(room=r, dst_page_ids=[], prompt_len=1), 60).slot
                for r in range(4)}) == 4  # fmt: skip


def test_an_older_grants_flag_on_a_reused_slot_lands_nothing(side):
    landings, writer, _ = side
    first = granted(landings, 1, [0])
    land(writer, first, 1, ok(1))
    assert len(landings.collect()) == 2
    grants = [granted(landings, r, [r]) for r in (2, 3, 4, 5)]  # every slot, one reused
    reused = next(g for g in grants if g.slot == first.slot)
    assert reused.seq != first.seq
    land(writer, first, 1, ok(reused.page_list.room))  # a stale writer, old sequence number
    assert landings.collect() == []
    land(writer, reused, 1, ok(reused.page_list.room))
    assert [type(e) for e in landings.collect()] == [KVReceived, Inbound]


def test_no_free_slot_is_an_error_not_a_silent_grant(side):
    landings, _, _ = side
    for room in range(4):
        granted(landings, room, [room])
    with pytest.raises(SlotsFull):
        landings.grant(m.PageList(room=9, dst_page_ids=[9], prompt_len=1), 60)


def test_a_status_too_long_for_its_slot_counts_once_both_came_in_either_order(side):
    landings, writer, _ = side
    a, b = granted(landings, 1, [0, 1]), granted(landings, 2, [2])
    land(writer, a, 2, None)  # flag first
    assert landings.collect() == []
    received, status = landings.on_status(PEER, ok(1))
    assert received.room == 1 and received.complete and status.msg == ok(1)
    assert landings.on_status(PEER, ok(2)) == []  # message first
    land(writer, b, 1, None)
    assert [type(e) for e in landings.collect()] == [KVReceived, Inbound]
    assert landings.on_status(PEER, ok(3)) is None  # not ours: handled as usual


def test_a_grant_prefill_dropped_ends_without_events_and_frees_its_pages(side):
    landings, writer, _ = side
    grant = granted(landings, 5, [4, 5])
    writer.write_status(grant.slot, None)
    writer.set_flag(grant.slot, grant.seq)
    assert landings.collect() == []  # prefill's own message (error, abort) says why
    assert landings.forget(5) == []


def test_a_forgotten_rooms_pages_stay_held_until_its_slot_is_set(side):
    landings, writer, _ = side
    grant = granted(landings, 3, [6, 7])
    assert landings.forget(3) == [6, 7]
    alive = lambda peer, instance: False  # noqa: E731
    assert landings.settle(alive) == []
    land(writer, grant, 2, ok(3))
    assert landings.settle(alive) == [PagesSettled([6, 7])]
    assert landings.collect() == []  # the room is gone: its status is dropped


def test_held_pages_are_settled_when_the_peer_is_gone_or_the_grant_expired(side, monkeypatch):
    landings, _, _ = side
    granted(landings, 1, [1])
    granted(landings, 2, [2], ttl_s=-ipc_landing.EXPIRY_MARGIN_S - 1)
    landings.forget(1), landings.forget(2)
    assert landings.settle(lambda peer, instance: False) == [PagesSettled([2])]  # expired
    monkeypatch.setattr(ipc_landing, "DEAD_GRACE_S", 0.0)
    assert landings.settle(lambda peer, instance: True) == [PagesSettled([1])]  # process gone


def test_held_pages_are_settled_once_the_process_granted_them_is_replaced(side, monkeypatch):
    """A prefill process restarted at the same address: the grants of the one before are
    dead even though a lane is bound there again; those of the new one are not."""
    landings, _, _ = side
    grant = landings.grant(m.PageList(room=1, dst_page_ids=[1], prompt_len=9), 60.0)
    landings.commit(PEER, grant, b"old")
    grant = landings.grant(m.PageList(room=2, dst_page_ids=[2], prompt_len=9), 60.0)
    landings.commit(PEER, grant, b"new")
    landings.forget(1), landings.forget(2)
    monkeypatch.setattr(ipc_landing, "DEAD_GRACE_S", 0.0)
    seen = []

    def replaced(peer, instance):
        seen.append((peer, instance))
        return instance != b"new"

    assert landings.settle(replaced) == [PagesSettled([1])]
    assert seen == [(PEER, b"old"), (PEER, b"new")]


def test_garbage_in_a_slot_is_counted_and_lands_nothing(side):
    landings, writer, rejected = side
    grant = granted(landings, 1, [1])
    writer.write_status(grant.slot, b"\xc1 not msgpack")
    writer.set_flag(grant.slot, grant.seq)
    assert landings.collect() == [] and rejected == ["ipc_status"]
    wrong_room = granted(landings, 2, [2])
    land(writer, wrong_room, 1, ok(99))
    assert landings.collect() == [] and rejected[-1] == "ipc_status_room"


def test_a_status_longer_than_the_payload_is_not_written(side):
    _, writer, _ = side
    assert not writer.write_status(0, b"x" * 512)
    assert writer.write_status(0, b"x" * 508)


def test_a_writer_refuses_slots_smaller_than_announced():
    board = SlotBoard(num_slots=2, payload_nbytes=64)
    try:
        pid, fd = board.where
        with pytest.raises(ValueError, match="smaller"):
            SlotWriter(pid, fd, 4096, 4096)
    finally:
        board.close()


def test_page_ids_go_past_the_status_and_a_send_counts_as_done_once_its_flag_passed(side):
    """Prefill puts a copy's page ids in the slot's payload, past the status, for its kernel
    to read in place; the status stays readable, and the send is done once the flag reached
    its sequence number (or a later grant's, once the slot is reused)."""
    landings, writer, _ = side
    grant = granted(landings, 1, [5, 6])
    status = encode(IpcStatus(num_pages=2, status=ok(1)))
    assert writer.write_status(grant.slot, status)
    at = writer.write_ids(grant.slot, 4 + len(status), np.array([8, 9]), np.array([5, 6]))
    flat = np.frombuffer(writer._map.mmap, dtype="<i4")  # what the GPU's int32 view reads
    assert flat[at : at + 4].tolist() == [8, 9, 5, 6]
    too_long = np.zeros(400, dtype=np.int64)
    assert writer.write_ids(grant.slot, 4 + len(status), too_long, too_long) is None
    assert not writer.passed(grant.slot, grant.seq)
    writer.set_flag(grant.slot, grant.seq)
    assert writer.passed(grant.slot, grant.seq) and writer.passed(grant.slot, grant.seq - 1)
    assert [type(e) for e in landings.collect()] == [KVReceived, Inbound]


@pytest.mark.parametrize("payload_nbytes", [64, 66, 67])
def test_page_ids_are_word_aligned_whatever_the_payload_size(payload_nbytes):
    """The kernel reads the ids as int32 words of the whole mapping: where a payload size
    is not a multiple of 4, each slot's ids still start on a word, inside the slot."""
    board = SlotBoard(num_slots=3, payload_nbytes=payload_nbytes)
    writer = SlotWriter(*board.where, board.num_slots, board.payload_nbytes)
    try:
        flat = np.frombuffer(writer._map.mmap, dtype=np.uint8)
        for slot in range(3):
            at = writer.write_ids(slot, 5, np.array([7, 8]), np.array([1, 2]))
            assert at is not None
            start = writer._map.payload_at(slot)
            assert start + 5 <= 4 * at and 4 * at + 16 <= start + payload_nbytes
            assert flat[4 * at : 4 * at + 16].view("<i4").tolist() == [7, 8, 1, 2]
            assert writer.write_ids(slot, 5, np.arange(8), np.arange(8)) is None  # 64 bytes
    finally:
        writer.close()
        board.close()


@pytest.mark.parametrize(
    ("dst", "expires_in_s", "why"),
    [
        ([4, 7, 9], 60, None),  # the page list as granted
        ([7, 9], 60, None),  # a subset (pages decode holds already)
        ([9, 4, 7], 60, None),  # another order
        ([4, 8], 60, "outside"),
        ([4, 4], 60, "duplicate"),
        ([4, 7, 9], -1, "expired"),
    ],
)
def test_prefill_writes_only_unexpired_granted_pages(dst, expires_in_s, why):
    """The prefill side's check before it queues a copy into decode's pool."""
    import time

    from pdserve.disagg.transfer.ipc_grants import Grant, Target, refusal

    expires_at = time.monotonic() + expires_in_s
    grant = Grant(slot=0, seq=1, dst=np.array([4, 7, 9]), expires_at=expires_at, dst_ids=[4, 7, 9])
    target = Target(words=None, slots=None)  # type: ignore[arg-type]
    for given in (dst, np.array(dst)):  # a list (compared as one) or any other sequence
        reason = refusal(grant, target, np.array(dst), given)
        assert (reason is None) if why is None else (why in reason)
    assert "granted no pages" in refusal(None, target, np.array(dst), dst)


def _grant(dst: list[int]):
    import time

    from pdserve.disagg.transfer.ipc_grants import Grant

    expires_at = time.monotonic() + 60
    return Grant(slot=0, seq=1, dst=np.array(dst), expires_at=expires_at, dst_ids=list(dst))


@pytest.mark.parametrize("src", [[1, 2, 3], [2, 2, 5]])  # a page sent twice: still granted
@pytest.mark.parametrize("dst", [[4, 7, 9], [9, 4], (4, 7, 9)])
def test_a_send_is_checked_against_its_grant_without_converting_the_granted_list(src, dst):
    """send_kv's ids (before `refusal`): the granted page list is the grant's own checked
    array; any other (a subset, another order, not a list) is converted and left to
    `refusal`. Sources are checked for range alone."""
    from pdserve.disagg.transfer.ipc_grants import Target, refusal, send_pairs

    grant, target = _grant([4, 7, 9]), Target(words=None, slots=None)  # type: ignore[arg-type]
    src = src[: len(dst)]
    s, d = send_pairs(grant, src, dst, num_pages=10)
    assert (d is grant.dst) == (dst == grant.dst_ids)
    assert s.tolist() == src and d.tolist() == list(dst)
    assert refusal(grant, target, d, dst) is None


@pytest.mark.parametrize(
    ("src", "dst", "why"),
    [
        ([1, 10], [4, 7], "src_page_ids out of range"),
        ([-1, 2], [4, 7], "src_page_ids out of range"),
        ([1, 2], [4, 7, 9], "2 source pages but 3 destination pages"),
        ([1, 2, 3, 5], [4, 7, 9], "4 source pages but 3"),
        ([[1], [2]], [4, 7], "flat list"),
        ([1, 2], [[4], [7]], "dst_page_ids must be a flat list"),
    ],
)
def test_a_send_with_bad_ids_is_refused_before_anything_is_queued(src, dst, why):
    from pdserve.disagg.transfer.ipc_grants import send_pairs

    for grant in (_grant([4, 7, 9]), _grant(dst) if np.ndim(dst) == 1 else None, None):
        with pytest.raises(ValueError, match=why):
            send_pairs(grant, src, dst, num_pages=10)


def test_a_lane_is_bound_while_its_owner_lives():
    """How decode tells that a prefill process is gone (its queued copies with it)."""
    from pdserve.disagg.transfer.ipc_lane import Lane, lane_address, lane_bound

    lane = Lane("test-owner-lane-bound")
    try:
        assert lane_bound(lane_address("test-owner-lane-bound"))
    finally:
        lane.close()
    assert not lane_bound(lane_address("test-owner-lane-bound"))
