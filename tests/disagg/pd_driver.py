"""A test driver that plays the router: the same body, with bootstrap fields, to a prefill
and a decode server at once (docs/protocol.md section 2), plus helpers to inspect both servers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import requests

ROOM_LIMIT = 2**63


@dataclass
class Leg:
    status: int
    body: Any
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def error(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message"))
        return str(self.body)


@dataclass
class PDResult:
    prefill: Leg
    decode: Leg


def random_room(rng: random.Random | None = None) -> int:
    return (rng or random).randrange(ROOM_LIMIT)


async def _post(session: aiohttp.ClientSession, url: str, body: dict, timeout_s: float) -> Leg:
    start = time.monotonic()
    try:
        async with session.post(
            url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as r:
            try:
                payload = await r.json(content_type=None)
            except ValueError:
                payload = await r.text()
            return Leg(r.status, payload, time.monotonic() - start)
    except asyncio.TimeoutError:
        return Leg(0, f"no answer within {timeout_s}s", time.monotonic() - start)


async def pd_generate_async(
    session: aiohttp.ClientSession,
    prefill_url: str,
    decode_url: str,
    body: dict,
    *,
    bootstrap_port: int | None,
    room: int | None = None,
    prefill_extra: dict | None = None,
    decode_extra: dict | None = None,
    path: str = "/generate",
    timeout_s: float = 60.0,
) -> PDResult:
    room = random_room() if room is None else room
    common = dict(
        body, bootstrap_host="127.0.0.1", bootstrap_port=bootstrap_port, bootstrap_room=room
    )
    prefill_body = dict(common, **(prefill_extra or {}))
    decode_body = dict(common, **(decode_extra or {}))
    prefill, decode = await asyncio.gather(
        _post(session, prefill_url + path, prefill_body, timeout_s),
        _post(session, decode_url + path, decode_body, timeout_s),
    )
    return PDResult(prefill, decode)


def run_many(coros_factory) -> list:
    """Run `coros_factory(session)` (a list of coroutines) concurrently on a fresh loop."""

    async def main():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*coros_factory(session))

    return asyncio.run(main())


def pd_generate(prefill_url: str, decode_url: str, body: dict, **kw) -> PDResult:
    return run_many(lambda s: [pd_generate_async(s, prefill_url, decode_url, body, **kw)])[0]


def get_load(url: str) -> list[dict]:
    return requests.get(url + "/get_load", timeout=10).json()


def pages_in_use(url: str) -> int:
    return sum(rank["num_used_pages"] for rank in get_load(url))


def rooms_in_flight(url: str) -> int:
    return sum(rank.get("num_disagg_rooms", 0) for rank in get_load(url))


def wait_idle(urls: list[str], timeout_s: float = 10.0) -> None:
    """Wait until every server reports no pages used and no rooms in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = {u: (pages_in_use(u), rooms_in_flight(u)) for u in urls}
        if all(v == (0, 0) for v in state.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"servers not idle after {timeout_s}s: (pages, rooms) = {state}")
        time.sleep(0.05)  # polling a condition with a deadline


def metric_value(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` (with these labels) in the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if labels and any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            total += sample.value
    return total


def check_delta_conversation(
    prefill_url: str,
    decode_url: str,
    bootstrap_port: int,
    reference=None,
    num_turns: int = 4,
    page_size: int = 16,
    seed: int = 7,
    moves_bytes: bool = True,
) -> None:
    """A conversation of `num_turns` (each prompt = the previous prompt + its answer + a new
    user message) through one prefill and one decode server: every turn moves only the pages
    past what decode held from the turn before, the same bytes counted on both sides, and
    (when `reference(body)` is given) answers its tokens. A backend that moves no bytes
    (`fake`) reports 0 bytes on both sides but the same delta."""
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 250) for _ in range(5 * page_size + 3)]
    page_nbytes = None
    held_tokens = 0  # tokens whose KV decode computed in the previous turn (its cache)
    for turn in range(num_turns):
        sampling = {"max_new_tokens": 9, "temperature": 0, "ignore_eos": True}
        body = {"input_ids": prompt, "sampling_params": sampling}
        result = pd_generate(prefill_url, decode_url, body, bootstrap_port=bootstrap_port)
        assert result.prefill.ok and result.decode.ok, (result.prefill.error, result.decode.error)
        answer, prefill_meta = result.decode.body, result.prefill.body["meta_info"]
        meta = answer["meta_info"]
        if reference is not None:
            assert answer["output_ids"] == reference(body), f"turn {turn}"
        expected_hit = min(held_tokens, len(prompt) - 1) // page_size * page_size
        assert meta["decode_cached_tokens"] == expected_hit, f"turn {turn}"
        num_sent_pages = -(-len(prompt) // page_size) - expected_hit // page_size
        if page_nbytes is None:
            page_nbytes = meta["kv_transfer_bytes"] // num_sent_pages
            assert (page_nbytes > 0) == moves_bytes
        # Both sides count the same bytes: the pages past decode's cached prefix only.
        assert meta["kv_transfer_bytes"] == num_sent_pages * page_nbytes, f"turn {turn}"
        assert prefill_meta["kv_transfer_bytes"] == meta["kv_transfer_bytes"]
        # The client's cached_tokens are prefill's (the prompt it did not compute).
        assert meta["cached_tokens"] == prefill_meta["cached_tokens"]
        if turn:
            assert meta["cached_tokens"] > 0 and expected_hit > 0
        # The last answer token has no KV yet: decode cached prompt + answer[:-1].
        held_tokens = len(prompt) + len(answer["output_ids"]) - 1
        user = [rng.randrange(3, 250) for _ in range(rng.choice([5, page_size, 2 * page_size + 9]))]
        prompt = prompt + answer["output_ids"] + user
    wait_idle([prefill_url, decode_url])
    for load in get_load(decode_url):  # nothing stays pinned: every cached page evictable
        assert load["num_cached_pages"] > 0
        assert load["num_evictable_pages"] == load["num_cached_pages"]


def leg_body(bootstrap_port: int, room: int, ids: list[int], rid: str, new_tokens: int = 2) -> dict:
    """One /generate leg of a PD request (the same body on both servers), greedy."""
    return {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
        "rid": rid,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port,
        "bootstrap_room": room,
    }


def post_async(url: str, body: dict, timeout_s: float = 60) -> concurrent.futures.Future:
    """POST `body` to `url`/generate in a thread; the future's result is the response."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(requests.post, url + "/generate", json=body, timeout=timeout_s)
    pool.shutdown(wait=False)
    return future
