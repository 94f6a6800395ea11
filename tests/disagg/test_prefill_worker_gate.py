"""The prefill worker holds a request back from its engine until decode's page list comes,
unless the pool keeps room for the largest request (`disagg.prefill_gate`): a parked room is
computed once listed, and times out or is aborted with the same answers as before, the
engine never seeing it. A real engine (tiny-random) and real transports over loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from pdserve.disagg import messages as m
from pdserve.disagg.config import DisaggConfig
from pdserve.disagg.delta import prompt_digest
from pdserve.disagg.prefill_worker import PrefillWorkerHooks
from pdserve.disagg.rooms import RoomState
from pdserve.disagg.transfer import Inbound, KVTransport, make_transport
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, SamplingParams
from pdserve.serving.protocol import DisaggInfo, GenerateReq, ReqOutput
from tests.disagg.transfer_peer import worker_turn

PAGE = 16
PROMPT_LEN = 20  # 2 pages
TIMEOUT_S = 30.0
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


class Pair:
    """A prefill worker's engine and hooks, and a decode-side transport to talk to it."""

    def __init__(self, num_pages: int, context_length: int = 4096):
        cfg = EngineConfig(
            model_path="tiny-random",
            page_size=PAGE,
            context_length=context_length,
            max_total_tokens=num_pages * PAGE,
        )
        self.engine = Engine.from_config(cfg)
        transport = make_transport("zmq", self.engine.kv_pool, "127.0.0.1")
        disagg = DisaggConfig(bootstrap_timeout_s=TIMEOUT_S)
        self.hooks = PrefillWorkerHooks(self.engine, disagg, transport, dp_rank=0)
        pool = torch.zeros(num_pages, transport.page_nbytes // 4)
        self.decode: KVTransport = make_transport("zmq", pool, None)
        self.peer: object | None = None
        self.answers: list[ReqOutput] = []
        self.statuses: list[m.RoomStatus] = []

    def generate(self, rid: str, room: int, prompt: list[int]) -> list[ReqOutput]:
        msg = GenerateReq(rid=rid, input_ids=prompt, sampling=GREEDY, disagg=DisaggInfo(room=room))
        return self.hooks.on_generate(msg)

    def page_list(self, room: int, dst_page_ids: list[int]) -> None:
        if self.peer is None:
            self.peer = self.decode.connect(self.hooks.kv_endpoint)
            self.decode.send(self.peer, m.Handshake(decode_id="d", layout=self.engine.kv_layout()))
        page_list = m.PageList(
            room=room,
            dst_page_ids=dst_page_ids,
            prompt_len=PROMPT_LEN,
            prompt_digest=prompt_digest(_prompt(room)),  # the prompt each test gives room
        )
        self.decode.send(self.peer, page_list)

    def turn(self) -> None:
        """One turn of the worker loop, and decode reading what came."""
        self.answers += worker_turn(self.engine, self.hooks)
        for event in self.decode.poll(5):
            if isinstance(event, Inbound) and isinstance(event.msg, m.RoomStatus):
                self.statuses.append(event.msg)

    def poll_past_deadline(self) -> list[ReqOutput]:
        """The worker's polls until past the bootstrap deadline, every 0.1 s of its clock (a
        running loop: one jump that long is a worker that stood still, disagg/stall.py)."""
        start, answers = time.monotonic(), []
        for num_turns in range(1, round((TIMEOUT_S + 1) / 0.1) + 1):
            answers += self.hooks.poll(start + num_turns * 0.1)
        return answers

    def turn_until(self, done, what: str) -> None:
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, f"never {what}: {self.answers} {self.statuses}"
            self.turn()

    def close(self) -> None:
        self.decode.close()
        self.hooks.close()


@pytest.fixture
def pairs() -> Iterator:
    started: list[Pair] = []

    def start(num_pages: int, context_length: int = 4096) -> Pair:
        started.append(Pair(num_pages, context_length))
        return started[-1]

    yield start
    for pair in started:
        pair.close()


def _prompt(seed: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 240 + 5 for i in range(PROMPT_LEN)]


def _greedy_first_token(engine: Engine, prompt: list[int]) -> int:
    engine.add_request(
        Request("reference", prompt, SamplingParams(max_new_tokens=1, temperature=0.0))
    )
    token_ids: list[int] = []
    while engine.has_work():
        token_ids += [t for out in engine.step() for t in out.new_token_ids]
    return token_ids[0]


def test_a_request_before_its_page_list_is_parked_under_a_tiny_pool_and_runs_once_listed(pairs):
    pair = pairs(num_pages=4)  # smaller than the context: nothing runs before its page list
    assert pair.generate("r1", 1, _prompt(1)) == []
    pair.turn()
    assert pair.engine.get("r1") is None and not pair.engine.has_work()
    assert pair.hooks.num_parked() == 1
    assert pair.hooks.rooms[1].state is RoomState.BOOTSTRAPPING

    pair.page_list(1, [0, 1])
    # The client's answer and decode's RoomStatus leave in one turn; decode may read the
    # status a turn later.
    pair.turn_until(
        lambda: any(a.finish_reason for a in pair.answers) and pair.statuses,
        "answered and told decode",
    )
    (status,) = pair.statuses
    assert status.ok and pair.answers[-1].finish_reason.type == "length"
    assert pair.hooks.num_parked() == 0 and not pair.hooks.rooms
    assert pair.engine.num_used_pages == 0
    assert status.first.token_id == _greedy_first_token(pair.engine, _prompt(1))


def test_unlisted_requests_fill_the_pool_less_the_largest_request_and_the_rest_wait(pairs):
    # 6 pages, a context of 2: 4 pages (two prompts) may be computed before their page list.
    pair = pairs(num_pages=6, context_length=2 * PAGE)
    for room in (1, 2, 3):
        assert pair.generate(f"r{room}", room, _prompt(room)) == []
    pair.turn_until(lambda: pair.hooks.rooms[2].src_page_ids is not None, "computed room 2")
    pair.turn()
    assert pair.hooks.rooms[1].src_page_ids is not None
    # Two free pages would take room 3, but then a listed room could find none.
    assert pair.engine.get("r3") is None and pair.hooks.num_parked() == 1
    assert pair.engine.num_used_pages == 4

    pair.page_list(1, [0, 1])  # room 1 is decode's now: room 3 takes its place
    pair.turn_until(lambda: pair.hooks.rooms[3].src_page_ids is not None, "computed room 3")
    pair.turn_until(lambda: pair.statuses, "sent room 1")
    assert [(s.room, s.ok) for s in pair.statuses] == [(1, True)]
    assert pair.hooks.num_parked() == 0


def test_a_parked_room_times_out_with_504_and_the_engine_never_sees_it(pairs):
    pair = pairs(num_pages=4)
    assert pair.generate("r1", 1, _prompt(1)) == []
    pair.turn()
    assert pair.engine.get("r1") is None
    (answer,) = pair.poll_past_deadline()
    assert answer.rid == "r1" and answer.error_status == 504
    assert answer.error_message == (
        f"timed out after {TIMEOUT_S:g}s waiting for decode's page list for room 1"
    )
    assert pair.hooks.num_parked() == 0 and not pair.hooks.rooms
    assert pair.engine.get("r1") is None and not pair.engine.has_work()
    assert pair.engine.num_used_pages == 0


def test_a_late_page_list_of_a_room_timed_out_for_it_hears_the_fault_is_decodes(pairs):
    """The worker itself marks its failure decode's fault, on its answer and on the one to
    decode's late page list (a frozen decode worker's, once it runs again): that answer had
    no origin, and decode's leg blamed prefill for it. Not left to the front end's RoomFailed,
    which may come after the page list."""
    pair = pairs(num_pages=4)
    assert pair.generate("r1", 1, _prompt(1)) == []
    pair.turn()
    (answer,) = pair.poll_past_deadline()
    assert answer.error_status == 504 and answer.error_origin == "decode"
    pair.page_list(1, [0, 1])
    pair.turn_until(lambda: pair.statuses, "answered the page list")
    (status,) = pair.statuses
    assert not status.ok and status.error_status == 504
    assert status.error == answer.error_message and status.error_origin == "decode"


def test_an_aborted_parked_room_is_answered_and_its_late_page_list_refused(pairs):
    pair = pairs(num_pages=4)
    assert pair.generate("r1", 1, _prompt(1)) == []
    pair.turn()
    assert pair.engine.get("r1") is None
    (answer,) = pair.hooks.on_abort("r1", "client gone")
    assert answer.rid == "r1" and answer.finish_reason.type == "abort"
    assert answer.finish_reason.message == "client gone"
    assert pair.engine.abort("r1", "client gone") is None  # what the worker calls next
    assert pair.hooks.num_parked() == 0 and not pair.hooks.rooms

    pair.page_list(1, [0, 1])
    pair.turn_until(lambda: pair.statuses, "answered the page list")
    (status,) = pair.statuses
    assert not status.ok and status.error_status == 499
    assert status.error == "aborted on prefill: client gone"
    assert status.error_origin is None  # not decode's fault
    assert pair.engine.num_used_pages == 0 and not pair.answers


def test_a_request_that_can_never_run_is_refused_at_once_not_parked(pairs):
    pair = pairs(num_pages=4)
    (answer,) = pair.generate("r1", 1, list(range(5, 5 + 4 * PAGE + 1)))
    assert answer.error_status == 400 and "more KV pages than the pool has" in answer.error_message
    assert pair.hooks.num_parked() == 0 and not pair.hooks.rooms
