"""cuda_ipc's messages (ipc_pool.py) on the CPU: a grant carries its page list, slot,
sequence number and expiry through the wire; a slot's payload decodes to the status it
holds; a message of the earlier pull protocol (version 5) does not decode as anything of
this one. The GPU half of the transport is in tests/gpu."""

from __future__ import annotations

import msgspec
import pytest

from pdserve.disagg import messages as m
from pdserve.disagg.transfer.ipc_pool import (
    IpcGrant,
    IpcLanded,
    IpcStatus,
    decode,
    decode_status,
    encode,
)


def test_a_grant_and_a_wake_survive_the_wire():
    page_list = m.PageList(room=4, dst_page_ids=[9, 2, 5], prompt_len=40, num_cached_tokens=16)
    grant = IpcGrant(page_list=page_list, slot=3, seq=77, expires_at=1234.5)
    assert decode(encode(grant)) == grant
    assert decode(encode(IpcLanded(rooms=[4, 8]))) == IpcLanded(rooms=[4, 8])
    assert decode(m.encode(m.Abort(room=4, reason="x"))) == m.Abort(room=4, reason="x")


def test_a_slot_payload_holds_the_status_or_says_it_follows():
    status = m.RoomStatus(room=4, ok=True, first=m.FirstToken(room=4, token_id=7, logprob=-0.5))
    assert decode_status(encode(IpcStatus(num_pages=3, status=status))).status == status
    assert decode_status(encode(IpcStatus(num_pages=3, status=None))).status is None
    with pytest.raises(msgspec.MsgspecError):
        decode_status(b"\xc1")


def test_a_version_5_pull_message_is_not_a_message_of_this_protocol():
    """Decode pulled in version 5 (IpcBatch of IpcCopy); the handshake refuses such a peer
    first, and its messages decode as nothing here."""
    old = {"type": "ipc_batch", "copies": [{"room": 1, "src_ids": b"", "dst_ids": b"",
                                           "status": {"type": "RoomStatus", "room": 1, "ok": True}}]}  # fmt: skip
    with pytest.raises(msgspec.ValidationError):
        decode(msgspec.msgpack.encode(old))
