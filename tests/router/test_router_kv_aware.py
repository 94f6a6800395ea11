"""kv_aware against real servers: two prefill servers (DP 2 each) and one decode server.
Requests that share a prefix land on the prefill rank that holds it (cached_tokens in the
answers), token ids, text and chat messages alike (the router tokenizes as the servers do);
a prefill server killed and started again is followed anew by the router; a decode leg in
flight loads its server with the tokens it may generate."""

from __future__ import annotations

import pytest
import requests

from tests.disagg.conftest import TINY, PDFactory, Prefill
from tests.helpers import checks_answered_while_pending, launch_server, wait_until
from tests.router.conftest import router_args, start_router

pytestmark = pytest.mark.timeout(300)
PAGE = 16
GREEDY = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}


def prompt(prefix: int, suffix: int) -> list[int]:
    """A 64-token (4-page) prefix shared by every `suffix`, then 8 tokens of its own."""
    head = [11 + prefix] + [20 + (i * 7 + prefix * 31) % 250 for i in range(63)]
    return head + [300 + suffix * 8 + i for i in range(8)]


@pytest.fixture(scope="module")
def cluster():
    factory = PDFactory()
    try:
        prefills = [factory.prefill(2), factory.prefill(2)]
        decode = factory.decode(1)
        args = router_args([(p.url, p.bootstrap_port) for p in prefills], [decode.url])
        with start_router([*args, "--policy", "kv_aware", "--dp-aware"]) as router:
            yield factory, prefills, decode, router
    finally:
        factory.stop_all()


def server_seq(url: str) -> int:
    """The last batch holding every cache change the server's workers have made: a dump
    drains each worker's events first (`/server_info`'s seq may not yet count events a
    loaded worker made but its front end has not published)."""
    dp_size = requests.get(f"{url}/server_info", timeout=10).json()["dp_size"]
    dumps = [
        requests.get(f"{url}/debug/kv_cache", params={"dp_rank": r}, timeout=30).json()
        for r in range(dp_size)
    ]
    return max(dump["seq"] for dump in dumps)


def router_seqs(router_url: str) -> dict[str, int | None]:
    index = requests.get(f"{router_url}/server_info", timeout=10).json()["kv_index"]
    return {url: entry["seq"] for url, entry in index.items()}


def wait_router_caught_up(router_url: str, urls: list[str]) -> None:
    """The router's index has applied every batch the servers published."""

    def caught_up() -> bool:
        seqs = router_seqs(router_url)
        return all(seqs.get(url) is not None and seqs[url] >= server_seq(url) for url in urls)

    wait_until(caught_up, 60, "the router's index to catch up with the servers' events")


def generate(router_url: str, ids: list[int]) -> dict:
    resp = requests.post(
        f"{router_url}/generate", json={"input_ids": ids, "sampling_params": GREEDY}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_requests_sharing_a_prefix_land_where_it_is_cached(cluster):
    _, prefills, decode, router = cluster
    urls = [p.url for p in prefills] + [decode.url]
    wait_router_caught_up(router.url, urls)
    for prefix in range(4):
        first = generate(router.url, prompt(prefix, 0))
        assert first["meta_info"]["cached_tokens"] == 0
        for suffix in range(1, 4):
            wait_router_caught_up(router.url, urls)
            answer = generate(router.url, prompt(prefix, suffix))
            assert answer["meta_info"]["cached_tokens"] == 4 * PAGE, (prefix, suffix)
    metrics = requests.get(f"{router.url}/metrics", timeout=10).text
    assert 'pdserve_router_kv_matched_tokens_bucket{le="64.0",role="prefill"}' in metrics


SYSTEM = (
    "You answer questions about the weather in a small town by the sea, where the wind "
    "comes from the west most days and the rain falls in the afternoon. Keep every answer "
    "short, name the day you mean, and say when you do not know. The harbour closes at "
    "night and the boats come back before the storm, while the lighthouse keeper writes "
    "down the height of every wave in a red book that nobody else reads."
)


def text_answer(router_url: str, route: str, body: dict) -> dict:
    resp = requests.post(f"{router_url}{route}", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def chat(router_url: str, messages: list[dict]) -> tuple[int, int, str]:
    """(prompt tokens, cached prompt tokens, the answer's text)."""
    body = {"model": "tiny-random", "messages": messages, "max_tokens": 4, "temperature": 0}
    answer = text_answer(router_url, "/v1/chat/completions", body)
    usage = answer["usage"]
    content = answer["choices"][0]["message"]["content"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], content


def test_text_and_chat_prompts_sharing_a_prefix_land_where_it_is_cached(cluster):
    """Without the router's tokenizer these are routed by load alone, which rotates over
    the four prefill ranks: most of the later requests would find nothing cached."""
    _, prefills, decode, router = cluster
    urls = [p.url for p in prefills] + [decode.url]

    def tokenizer_loaded() -> bool:
        info = requests.get(f"{router.url}/server_info", timeout=10).json()
        return info["prompt_tokenizer_path"] is not None

    wait_until(tokenizer_loaded, 120, "the router to load the servers' tokenizer")
    cached = []
    for question in range(4):
        wait_router_caught_up(router.url, urls)
        body = {"text": f"{SYSTEM} Question {question}: wind?", "sampling_params": GREEDY}
        cached.append(text_answer(router.url, "/generate", body)["meta_info"]["cached_tokens"])
    assert cached[0] == 0 and min(cached[1:]) >= 4 * PAGE, cached
    history = [{"role": "system", "content": SYSTEM.replace("sea", "lake")}]
    for turn in range(4):  # one conversation: each turn's prompt holds the previous one
        wait_router_caught_up(router.url, urls)
        history.append({"role": "user", "content": f"And on day {turn}, any rain?"})
        prompt_tokens, cached_tokens, content = chat(router.url, history)
        history.append({"role": "assistant", "content": content})
        if turn == 0:
            assert cached_tokens == 0
            previous = prompt_tokens
        else:
            assert cached_tokens >= previous - PAGE, (turn, cached_tokens, previous)
            previous = prompt_tokens


def test_a_restarted_prefill_server_is_followed_again(cluster):
    factory, prefills, decode, router = cluster
    old = prefills[1]
    port = int(old.url.rsplit(":", 1)[1])
    old.server.stop()

    def healthy(url: str) -> bool:
        workers = requests.get(f"{router.url}/workers", timeout=10).json()
        workers = workers["workers"] if isinstance(workers, dict) else workers
        return any(w["url"] == url and w["healthy"] for w in workers)

    wait_until(lambda: not healthy(old.url), 60, "the router to see the server down")
    assert old.url not in router_seqs(router.url)
    args = [*TINY, "--mode", "prefill", "--dp-size", "2", "--bootstrap-port"]
    args.append(str(old.bootstrap_port))
    bootstrap_ready = f"http://127.0.0.1:{old.bootstrap_port}/route"
    new = launch_server(args, port=port, extra_ready_urls=[bootstrap_ready])
    factory.started.append(new)
    prefills[1] = Prefill(new, old.bootstrap_port)
    wait_until(lambda: healthy(new.url), 60, "the router to see the server back")
    wait_router_caught_up(router.url, [p.url for p in prefills])
    for suffix in range(6):  # both prefill servers get some of these
        generate(router.url, prompt(9 + suffix, 0))
    wait_router_caught_up(router.url, [p.url for p in prefills])
    index = requests.get(f"{router.url}/server_info", timeout=10).json()["kv_index"]
    assert sum(index[new.url]["num_cached_pages"].values()) > 0


def test_a_decode_leg_in_flight_counts_the_tokens_it_may_generate(cluster):
    """While a stream decodes, the router's load term for its decode server holds the prompt
    tokens it received and the max_new_tokens it may still generate; 0 once it is done."""
    _, _, decode, router = cluster
    ids = prompt(prefix=41, suffix=0)
    params = {"max_new_tokens": 1000, "temperature": 0.0, "ignore_eos": True}
    body = {"input_ids": ids, "sampling_params": params, "stream": True}

    def decode_tokens_in_flight() -> int:
        workers = requests.get(f"{router.url}/workers", timeout=10).json()["workers"]
        return next(w["tokens_in_flight"] for w in workers if w["url"] == decode.url)

    with requests.post(f"{router.url}/generate", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200, resp.text
        lines = resp.iter_lines()  # one iterator: dropping it would close the stream
        first = next(line for line in lines if line)
        assert first.startswith(b"data:")
        assert decode_tokens_in_flight() == len(ids) + 1000  # nothing of it cached on decode
        for _ in lines:
            pass
    wait_until(lambda: decode_tokens_in_flight() == 0, 20, "the decode leg to be counted done")


def test_ids_that_are_not_token_ids_get_the_servers_400_not_a_router_error(cluster):
    _, _, _, router = cluster
    for bad in ("x", 2**70):
        ids = [*prompt(0, 0)[:20], bad, *prompt(0, 0)[21:]]
        body = {"input_ids": ids, "sampling_params": GREEDY}
        resp = requests.post(f"{router.url}/generate", json=body, timeout=60)
        assert resp.status_code == 400, (bad, resp.status_code, resp.text)


def test_a_huge_text_prompt_is_tokenized_without_stalling_the_router(cluster):
    """kv_aware tokenizes text prompts in the router: 1 MB of text takes about a second,
    during which the router's loop answered no one. `lora_path` makes the servers refuse
    the request before they tokenize it, so the health checks answered are the router's."""
    _, _, _, router = cluster
    body = {"text": "hello " * 170_000, "lora_path": "x"}
    answer, answered = checks_answered_while_pending(router.url, "/generate", body)
    assert answer.startswith(b"HTTP/1.1 400") and b"lora_path" in answer, answer
    assert answered >= 5, f"only {answered} health checks answered during tokenization"
