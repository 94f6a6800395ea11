"""A prefill-like peer process stopped (SIGSTOP) twice, past the heartbeat: decode's zmq
transport must report the loss both times. After ZeroMQ reconnected, its monitor named the
endpoint `tcp://[::ffff:127.0.0.1]:port` (the socket has IPV6 set), which the transport did
not recognise: the second drop went unseen, ZeroMQ dialed again under decode's routing id,
and the resumed prefill answered the page lists it read from the old connection to a routing
id libzmq had made up for it (ROUTER_HANDOVER): those rooms waited out their 30 s deadlines
(the chaos soak of 2026-12-08, nixl, forward)."""

from __future__ import annotations

import os
import signal

from pdserve.disagg import messages as m
from pdserve.disagg.transfer import Inbound
from pdserve.disagg.transfer.base import PeerLost, TransportOptions
from pdserve.disagg.transfer.zmq.transport import ZmqTransport
from tests.disagg.transfer_peer import make_pool, poll_until, start_peer


def _lost(events: list) -> bool:
    return any(isinstance(e, PeerLost) for e in events)


def _answered(seq: int):
    return lambda events: any(
        isinstance(e, Inbound) and isinstance(e.msg, m.Pong) and e.msg.seq == seq for e in events
    )


def test_decode_sees_each_freeze_of_a_prefill_peer_also_after_a_reconnect():
    options = TransportOptions(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0)
    decode = ZmqTransport(make_pool(8, seed=1), options=options)
    try:
        with start_peer("--listen") as (proc, endpoint):
            peer = decode.connect(endpoint)
            for seq in (1, 2):  # the second time on the connection ZeroMQ made again
                decode.send(peer, m.Ping(seq=seq))
                poll_until(decode, _answered(seq), timeout_s=20)  # the connection is up
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    poll_until(decode, _lost, timeout_s=10)  # heartbeat timeout: 1 s
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
    finally:
        decode.close()
