"""cuda_ipc's packed page ids (ipc_pool.py): what prefill packs decode unpacks, and decode
refuses ids that are not whole, in range and distinct (its grant check then refuses the
room) without a Python int per page. The GPU half of the transport is in tests/gpu."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.ipc_pool import (
    PAGE_ID,
    IpcBatch,
    IpcCopy,
    decode,
    encode,
    pack_ids,
    unpack_ids,
)


def test_packed_ids_survive_the_wire_in_order():
    src, dst = np.array([7, 3, 11, 0]), np.array([1, 2, 9, 5], dtype=np.int64)
    copy = IpcCopy(
        room=4, src_ids=pack_ids(src), dst_ids=pack_ids(dst), status=m.RoomStatus(room=4, ok=True)
    )
    (got,) = decode(encode(IpcBatch(copies=[copy]))).copies
    assert unpack_ids(got.src_ids, 12, "src").tolist() == [7, 3, 11, 0]
    assert unpack_ids(got.dst_ids, 10, "dst").tolist() == [1, 2, 9, 5]
    assert unpack_ids(b"", 10, "dst").size == 0
    assert len(got.src_ids) == 4 * PAGE_ID.itemsize


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01\x00\x00", "whole number"),
        (np.array([3, 10], dtype="<i4").tobytes(), "out of range"),
        (np.array([-1], dtype="<i4").tobytes(), "out of range"),
        (np.array([4, 2, 4], dtype="<i4").tobytes(), "duplicate"),
    ],
)
def test_ids_that_are_not_whole_in_range_and_distinct_are_refused(data, why):
    with pytest.raises(ValueError, match=why):
        unpack_ids(data, 10, "dst_ids")


def test_a_copy_with_ids_as_a_list_is_not_an_ipc_copy():
    """A peer of protocol version 4 sent int lists; the handshake refuses it first, and the
    message itself does not decode as this version's IpcCopy."""
    old = {"type": "ipc_batch", "copies": [{"room": 1, "src_page_ids": [1], "dst_page_ids": [2],
                                           "status": {"type": "RoomStatus", "room": 1, "ok": True}}]}  # fmt: skip
    with pytest.raises(msgspec.ValidationError):
        decode(msgspec.msgpack.encode(old))
