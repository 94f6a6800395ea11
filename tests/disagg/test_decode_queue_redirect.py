"""A room queued on decode (no request slot) whose lease the prefill home worker answers with
a Redirect (its front end dispatched the room to another worker, --rank-mismatch forward):
the lease, and later the page list, go to that worker; one that never answers the KV
handshake fails the room at the bootstrap deadline naming it. A queued room has no deadline
of its own, and the handshake it was redirected into had none either: it waited for good.
A real engine and decode hooks; the prefill workers are real transports the test plays."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.decode_worker import DecodeWorkerHooks
from pdserve.disagg.transfer import Inbound, KVTransport, make_transport
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import SamplingParams
from pdserve.serving.protocol import DisaggInfo, GenerateReq, ReqOutput

TIMEOUT_S = 1.0
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


def decode_hooks(cfg: DisaggConfig | None = None, **engine_options) -> DecodeWorkerHooks:
    """A decode worker's hooks on a real tiny-random engine (page size 16), not yet bound to
    any prefill worker."""
    engine = Engine.from_config(
        EngineConfig(model_path="tiny-random", page_size=16, **engine_options)
    )
    return DecodeWorkerHooks(
        engine, cfg or DisaggConfig(), make_transport("zmq", engine.kv_pool, None), "d"
    )


def prefill_side(page_nbytes: int) -> KVTransport:
    return make_transport("zmq", torch.zeros(8, page_nbytes // 4), "127.0.0.1")


def play_prefill(
    hooks: DecodeWorkerHooks,
    prefill: KVTransport,
    now: float,
    seen: list[object],
    outputs: list[ReqOutput],
    answer: Callable[[Inbound], None],
) -> None:
    """One turn of decode against a prefill worker the test plays: decode's hooks polled,
    then each message prefill got recorded in `seen`, a handshake accepted and any other
    message handed to `answer`."""
    outputs.extend(hooks.poll(now))
    for event in prefill.poll(5):
        if not isinstance(event, Inbound):
            continue
        seen.append(event.msg)
        if isinstance(event.msg, m.Handshake):
            prefill.send(event.peer, m.HandshakeResult(ok=True))
        else:
            answer(event)


def request(room: int, endpoint: str) -> GenerateReq:
    info = DisaggInfo(room=room, prefill_dp_rank=0, prefill_endpoint=endpoint)
    return GenerateReq(rid=f"r{room}", input_ids=[5, 6, 7, 8], sampling=GREEDY, disagg=info)


def test_a_queued_room_follows_a_redirect_and_its_handshake_has_a_deadline() -> None:
    hooks = decode_hooks(DisaggConfig(bootstrap_timeout_s=TIMEOUT_S), max_running_requests=1)
    home = prefill_side(hooks.transport.page_nbytes)
    silent = prefill_side(hooks.transport.page_nbytes)  # never polled: no handshake answer
    seen: list[object] = []
    outputs: list[ReqOutput] = []

    def redirect(event: Inbound) -> None:
        if isinstance(event.msg, m.RoomsQueued) and 2 in event.msg.rooms:
            home.send(event.peer, m.Redirect(room=2, dp_rank=1, kv_endpoint=silent.endpoint))

    def turn(now: float) -> None:
        play_prefill(hooks, home, now, seen, outputs, redirect)

    def until(cond, what: str) -> float:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, f"never: {what}; saw {seen}, {outputs}"
            turn(time.monotonic())
        return time.monotonic()

    try:
        outputs += hooks.on_generate(request(1, home.endpoint))  # takes the one request slot
        until(lambda: any(isinstance(x, m.PageList) for x in seen), "room 1's page list")
        outputs += hooks.on_generate(request(2, home.endpoint))
        until(lambda: 2 in hooks.queue and hooks.rooms[2].endpoint == silent.endpoint, "redirect")
        # Relayed (decode's kv_relay_seconds counts it, as prefill's rooms_forwarded does;
        # under load the PD forward test saw fewer relays than forwards).
        assert hooks.rooms[2].redirected_at is not None
        now = until(lambda: True, "")
        assert not [o for o in outputs if o.rid == "r2"]  # queued, not failed
        turn(now + 2 * TIMEOUT_S)
        (failed,) = [o for o in outputs if o.rid == "r2"]
        assert failed.error_status == 504, failed
        assert f"waiting for the KV handshake with {silent.endpoint}" in failed.error_message
        assert 2 not in hooks.rooms and 2 not in hooks.queue
    finally:
        hooks.close()
        home.close()
        silent.close()
