"""Whose fault decode's leg says a room's failure is, when prefill failed the room: the
prefill server's (`origin: prefill`), unless prefill says decode caused it (no page list in
time, a lost or restarted decode), then decode's own (no origin), on both ways decode hears
of it: the KV channel's failed RoomStatus (`error_origin`) and a rank query's failure
(`origin`). Both were always `prefill`: the two legs blamed each other. The RoomStatus field
is optional both ways, so peers of either version still talk (protocol version unchanged)."""

from __future__ import annotations

import time

import msgspec

from pdserve.disagg import messages as m
from pdserve.disagg.bootstrap_registry import RoomFailure
from pdserve.disagg.peer_info import room_failure_error
from pdserve.disagg.transfer import Inbound
from pdserve.serving.protocol import ReqOutput
from tests.disagg.test_decode_queue_redirect import decode_hooks, prefill_side, request

# A failed RoomStatus's error_origin -> the origin of decode's leg.
KV_CHANNEL_CASES = {1: ("decode", None), 2: (None, "prefill"), 3: ("router", "prefill")}


def test_a_failed_room_status_is_prefills_fault_unless_it_names_decode() -> None:
    hooks = decode_hooks()
    prefill = prefill_side(hooks.transport.page_nbytes)
    outputs: list[ReqOutput] = []
    try:
        for room in KV_CHANNEL_CASES:
            outputs += hooks.on_generate(request(room, prefill.endpoint))
        deadline = time.monotonic() + 30
        while len(outputs) < len(KV_CHANNEL_CASES):
            assert time.monotonic() < deadline, f"rooms never failed: {outputs}"
            outputs += hooks.poll(time.monotonic())
            for event in prefill.poll(5):  # the prefill worker, played: it failed each room
                if not isinstance(event, Inbound):
                    continue
                if isinstance(event.msg, m.Handshake):
                    prefill.send(event.peer, m.HandshakeResult(ok=True))
                elif isinstance(event.msg, m.PageList):
                    room = event.msg.room
                    failed = m.RoomStatus(
                        room=room,
                        ok=False,
                        error=f"prefill failed room {room}",
                        error_status=504,
                        error_origin=KV_CHANNEL_CASES[room][0],
                    )
                    prefill.send(event.peer, failed)
    finally:
        prefill.close()
        hooks.close()
    for out in outputs:
        room = int(out.rid[1:])
        assert out.error_status == 504 and out.error_message == f"prefill failed room {room}"
        assert out.error_origin == KV_CHANNEL_CASES[room][1], out
    assert hooks.engine.num_used_pages == 0 and not hooks.rooms


def test_a_rank_querys_failure_is_prefills_fault_unless_it_names_decode() -> None:
    for origin, leg_origin in (("decode", None), ("prefill", "prefill"), (None, "prefill")):
        error = room_failure_error(RoomFailure("prefill failed the room", 504, origin))
        assert (error.status, error.message) == (504, "prefill failed the room")
        assert error.origin == leg_origin, origin


class RoomStatus(msgspec.Struct, tag=True, kw_only=True):
    """RoomStatus as a peer older than `error_origin` has it (the same tag)."""

    room: int
    ok: bool
    first: m.FirstToken | None = None
    error: str | None = None
    error_status: int = 500


def test_room_status_error_origin_is_optional_both_ways() -> None:
    old = RoomStatus(room=1, ok=False, error="x", error_status=504)
    assert m.decode(msgspec.msgpack.encode(old)) == m.RoomStatus(
        room=1, ok=False, error="x", error_status=504, error_origin=None
    )
    new = m.RoomStatus(room=1, ok=False, error="x", error_status=504, error_origin="decode")
    assert msgspec.msgpack.decode(m.encode(new), type=RoomStatus) == old  # ignored there


def test_a_prefill_kv_endpoint_decode_cannot_connect_to_is_prefills_fault_and_keeps_no_room():
    """A prefill server registered a KV endpoint ZeroMQ refuses (no port): the transport's
    ValueError escaped on_generate after the room was recorded, so the worker answered
    'worker error' 500, decode's own fault (a breaker hit on it), and the room sat in
    decode's load as a waiting request until the bootstrap deadline."""
    hooks = decode_hooks()
    try:
        (out,) = hooks.on_generate(request(1, "tcp://127.0.0.1"))
    finally:
        hooks.close()
    assert out.error_status == 502 and out.error_origin == "prefill", out
    assert "tcp://127.0.0.1" in out.error_message
    assert not hooks.rooms and hooks.num_parked() == 0 and hooks.num_parked_tokens() == 0
