"""SGLang's own router (`sglang-router` 0.3.2, PD mode) drives our prefill + decode servers
unchanged: /generate single, batch and streamed, and chat, return the colocated tokens."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pdserve.procs import http_status
from tests.disagg.conftest import PDFactory
from tests.disagg.pd_driver import get_load, rooms_in_flight, wait_idle
from tests.helpers import PYTHON, ServerProcess, free_port, wait_until
from tests.router.test_router_pd import GREEDY, MESSAGES, chat_text, final_ids, post, streamed

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model_dir() -> str:
    """SGLang's router reads `model_path` from /server_info and fetches a tokenizer unless
    it is a local directory: give the servers the tiny model's directory."""
    from pdserve.engine.loader import resolve_model_dir

    return resolve_model_dir("tiny-random")


def sglang_router_process(
    prefills: list[tuple[str, int]], decode_urls: list[str], policy: str = "round_robin"
) -> ServerProcess:
    """SGLang's router in PD mode over these (prefill URL, bootstrap port) and decode URLs,
    on 127.0.0.1; not started (`.start()`, stop it with `.__exit__`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    router = ServerProcess([], [f"{url}/readiness"], url=url)
    router.argv = [PYTHON, "-m", "sglang_router.launch_router", "--pd-disaggregation"]
    for prefill_url, bootstrap_port in prefills:
        router.argv += ["--prefill", prefill_url, str(bootstrap_port)]
    for decode_url in decode_urls:
        router.argv += ["--decode", decode_url]
    router.argv += [
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())),
        *("--policy", policy, "--log-level", "warn"),
    ]
    return router


@pytest.fixture(scope="module")
def sglang_router(model_dir):
    factory = PDFactory()
    router = None
    try:
        # two DP ranks each: it sends no rank, so decode finds prefill's by the fast path
        prefill = factory.prefill(2, ["--model-path", model_dir])
        decode = factory.decode(2, ["--model-path", model_dir])
        router = sglang_router_process([(prefill.url, prefill.bootstrap_port)], [decode.url])
        router.worker_urls = [prefill.url, decode.url]  # for wait_idle
        yield router.start(timeout_s=120)
    finally:
        if router is not None:
            router.__exit__(None, None, None)
        factory.stop_all()


@pytest.mark.parametrize(
    "body",
    [
        {"text": "The capital of France is", "sampling_params": GREEDY},
        # (0.3.2 answers a batch of texts with 422 before any server sees it; ours routes it)
        {"input_ids": [[7, 8, 9], list(range(20, 60))], "sampling_params": GREEDY},
    ],
)
def test_sglang_router_generate_equals_colocated(sglang_router, tiny_server, body):
    want = post(tiny_server.url + "/generate", body).json()
    got = post(sglang_router.url + "/generate", body).json()
    strip = (
        (lambda a: [x["output_ids"] for x in a])
        if isinstance(want, list)
        else (lambda a: a["output_ids"])
    )
    assert strip(got) == strip(want)
    assert final_ids(streamed(sglang_router.url + "/generate", body)) == final_ids(
        streamed(tiny_server.url + "/generate", body)
    )


def test_sglang_router_chat_equals_colocated(sglang_router, tiny_server, model_dir):
    body = {"model": "tiny-random", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    want = chat_text(post(tiny_server.url + "/v1/chat/completions", body).json())
    body["model"] = model_dir  # the PD servers' --model-path, so their model name
    assert chat_text(post(sglang_router.url + "/v1/chat/completions", body).json()) == want
    events = streamed(sglang_router.url + "/v1/chat/completions", body)
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == want[0]


def test_sglang_router_completions_with_n_equal_colocated(sglang_router, tiny_server, model_dir):
    """SGLang's router sends one bootstrap_room with a completions `n`; each sample takes
    room + index, as SGLang's servers do (the second sample was refused: room in flight)."""
    body = {"model": "tiny-random", "prompt": "Once upon", "n": 3, "max_tokens": 6}
    body |= {"temperature": 1.0, "seed": 4}
    want = [c["text"] for c in post(tiny_server.url + "/v1/completions", body).json()["choices"]]
    assert len(set(want)) > 1  # seeded samples that differ
    body["model"] = model_dir
    got = post(sglang_router.url + "/v1/completions", body).json()["choices"]
    assert [c["text"] for c in got] == want


def test_sglang_router_completions_prompt_list_with_n_equal_colocated(
    sglang_router, tiny_server, model_dir
):
    """SGLang's router sends one room per prompt for a completions prompt list with `n`:
    sample j of prompt i takes that prompt's room + j (it was refused: 2 rooms for 4
    items), streamed and not, and both servers are idle after."""
    body = {"model": "tiny-random", "prompt": ["Once", "upon a"], "n": 2, "max_tokens": 5}
    body |= {"temperature": 1.0, "seed": 4}
    want = post(tiny_server.url + "/v1/completions", body).json()["choices"]
    body["model"] = model_dir
    got = post(sglang_router.url + "/v1/completions", body).json()["choices"]
    assert [(c["index"], c["text"]) for c in got] == [(c["index"], c["text"]) for c in want]
    events = streamed(sglang_router.url + "/v1/completions", body)
    texts = {c["index"]: "" for c in want}
    for event in events:
        for c in event["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == {c["index"]: c["text"] for c in want}
    wait_idle(sglang_router.worker_urls)


def test_sglang_router_merges_prompt_logprobs_of_one_request_as_colocated(
    sglang_router, tiny_server
):
    """It puts prefill's input_token_logprobs in front of decode's (empty: decode computed
    no prompt token): every position once, as the colocated server's."""
    body = {"input_ids": list(range(5, 45)), "sampling_params": GREEDY}
    body |= {"return_logprob": True, "logprob_start_len": 0}
    want = post(tiny_server.url + "/generate", body).json()["meta_info"]
    got = post(sglang_router.url + "/generate", body).json()["meta_info"]
    for name in ("input_token_logprobs", "output_token_logprobs"):
        assert [x[1] for x in got[name]] == [x[1] for x in want[name]], name
        assert [x[0] for x in got[name]] == pytest.approx([x[0] for x in want[name]], abs=1e-5)
    wait_idle(sglang_router.worker_urls)


def test_sglang_router_retries_at_once_past_a_draining_decode_server(tiny_server):
    """A decode server draining (SIGTERM, a request still running) answers new requests 503
    once their body is read, and their prefill legs fail at once: SGLang's router waits for
    both legs, and with the port closed it held each prefill leg sent with it until the
    bootstrap deadline (60 s here) before it retried on the other decode server."""
    factory = PDFactory()
    try:
        prefill = factory.prefill(1, ["--bootstrap-timeout-s", "60"])
        decodes = [factory.decode(1, ["--shutdown-timeout-s", "120"]) for _ in range(2)]
        with (
            sglang_router_process(
                [(prefill.url, prefill.bootstrap_port)], [d.url for d in decodes]
            ) as router,
            ThreadPoolExecutor(2) as pool,
        ):
            router.start(timeout_s=120)
            params = {**GREEDY, "max_new_tokens": 3000, "ignore_eos": True}
            long_body = {"input_ids": list(range(5, 40)), "sampling_params": params}
            send = lambda: requests.post(router.url + "/generate", json=long_body, timeout=120)  # noqa: E731
            longs = [pool.submit(send) for _ in range(2)]
            running = lambda d: sum(r["num_reqs"] for r in get_load(d.url))  # noqa: E731
            wait_until(lambda: sum(map(running, decodes)) == 2, 30, "the long requests")
            draining = max(decodes, key=running)
            draining.signal_group(signal.SIGTERM)
            wait_until(lambda: http_status(draining.url + "/health") != 200, 30, "the drain")
            body = {"input_ids": list(range(5, 45)), "sampling_params": GREEDY}
            want = post(tiny_server.url + "/generate", body).json()["output_ids"]
            for _ in range(3):  # round robin: some pairs name the draining server
                got = requests.post(router.url + "/generate", json=body, timeout=30)
                assert got.status_code == 200 and got.json()["output_ids"] == want, got.text
            wait_until(lambda: rooms_in_flight(prefill.url) == 0, 10, "prefill's rooms")
            for decode in decodes:  # end the long requests
                requests.post(decode.url + "/abort_request", json={"abort_all": True}, timeout=10)
            [f.result(60) for f in longs]
    finally:
        factory.stop_all()
