"""`pdserve router` in front of real prefill + decode servers (tiny-random): at temperature
0 the tokens equal the colocated server's on every route, streamed or not, batched or not,
including through the `openai` client; and the prompt logprobs equal too."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.disagg.conftest import PDFactory
from tests.disagg.pd_driver import wait_idle
from tests.helpers import http_json, wait_until
from tests.router.conftest import router_args, start_router

pytestmark = pytest.mark.timeout(300)

GREEDY = {"max_new_tokens": 8, "temperature": 0}
GENERATE_BODIES = [
    {"text": "The capital of France is", "sampling_params": GREEDY},
    {"input_ids": list(range(5, 45)), "sampling_params": GREEDY},
    {"text": ["a b c", "hello there, how are", "x"], "sampling_params": GREEDY},
    {"input_ids": [[7, 8, 9], list(range(20, 60))], "sampling_params": GREEDY},
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def pd_pair():
    factory = PDFactory()
    try:
        yield factory.prefill(1), factory.decode(1)
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def router(pd_pair):
    prefill, decode = pd_pair
    with start_router(router_args([(prefill.url, prefill.bootstrap_port)], [decode.url])) as r:
        yield r


def post(url: str, body: dict) -> requests.Response:
    resp = requests.post(url, json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp


def streamed(url: str, body: dict) -> list[dict]:
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=60) as resp:
        assert resp.status_code == 200, resp.text
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert not any("error" in e for e in events), events
    return events


def final_ids(events: list[dict]) -> dict[int, list[int]]:
    """The last cumulative output_ids of each batch index."""
    return {e.get("index", 0): e["output_ids"] for e in events}


def chat_text(answer: dict) -> list[str]:
    return [c["message"]["content"] for c in answer["choices"]]


def stream_text(events: list[dict], key: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            piece = c["delta"].get("content", "") if key == "delta" else c["text"]
            out[c["index"]] = out.get(c["index"], "") + piece
    return out


def assert_logprobs_close(got: list, want: list) -> None:
    """[logprob, token_id, text] triples: same tokens, logprobs equal to 1e-4."""
    assert [t[1] for t in got] == [t[1] for t in want]
    assert [t[0] is None for t in got] == [t[0] is None for t in want]
    assert [t[0] for t in got if t[0] is not None] == pytest.approx(
        [t[0] for t in want if t[0] is not None], abs=1e-4
    )


@pytest.mark.parametrize("body", GENERATE_BODIES)
def test_generate_equals_colocated(router, tiny_server, body):
    want = post(tiny_server.url + "/generate", body).json()
    got = post(router.url + "/generate", body).json()
    if isinstance(want, list):
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    else:
        assert got["output_ids"] == want["output_ids"] and got["text"] == want["text"]
    assert final_ids(streamed(router.url + "/generate", body)) == final_ids(
        streamed(tiny_server.url + "/generate", body)
    )


def test_prompt_logprobs_equal_colocated(router, tiny_server):
    body = {
        "text": "one two three four",
        "return_logprob": True,
        "logprob_start_len": 0,
        "sampling_params": GREEDY,
    }
    want = post(tiny_server.url + "/generate", body).json()["meta_info"]
    got = post(router.url + "/generate", body).json()["meta_info"]
    assert len(want["input_token_logprobs"]) == want["prompt_tokens"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert_logprobs_close(got[key], want[key])
    last = streamed(router.url + "/generate", body)[-1]["meta_info"]
    assert_logprobs_close(last["input_token_logprobs"], want["input_token_logprobs"])


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_chat_equals_colocated(router, tiny_server, n, echo):
    """With `echo` after an assistant message, its text leads every choice, streamed too."""
    messages = [*MESSAGES, {"role": "assistant", "content": "Sure:"}] if echo else MESSAGES
    body = {"model": "tiny-random", "messages": messages, "max_tokens": 8, "temperature": 0}
    body |= {"n": n, "echo": echo}
    url = "/v1/chat/completions"
    want = chat_text(post(tiny_server.url + url, body).json())
    assert all(text.startswith("Sure:") for text in want) == echo
    assert chat_text(post(router.url + url, body).json()) == want
    assert stream_text(streamed(router.url + url, body), "delta") == dict(enumerate(want))


def test_completions_equal_colocated(router, tiny_server):
    body = {
        "model": "tiny-random",
        "prompt": ["Once upon", "a time"],
        "max_tokens": 8,
        "temperature": 0,
    }
    url = "/v1/completions"
    want = [c["text"] for c in post(tiny_server.url + url, body).json()["choices"]]
    assert [c["text"] for c in post(router.url + url, body).json()["choices"]] == want
    assert stream_text(streamed(router.url + url, body), "text") == dict(enumerate(want))


ECHO_BODIES = [
    # lm-evaluation-harness's loglikelihood request: the prompt's logprobs only
    {"prompt": "one two three four", "echo": True, "logprobs": 1, "max_tokens": 0},
    {"prompt": [[5, 9, 17, 33], [40, 41, 42]], "n": 2, "echo": True, "logprobs": 2},
    {"prompt": "Once upon", "echo": True},
]


def streamed_choices(events: list[dict]) -> list[dict]:
    """Streamed completions chunks joined into whole choices (text and logprobs lists)."""
    whole: dict[int, dict] = {}
    for event in events:
        for c in event["choices"]:
            choice = whole.setdefault(c["index"], {"index": c["index"], "text": ""})
            choice["text"] += c["text"]
            if c["logprobs"] is None:
                choice["logprobs"] = None
                continue
            logprobs = choice.setdefault("logprobs", {})
            for key, values in c["logprobs"].items():
                logprobs.setdefault(key, []).extend(values)
    return [whole[i] for i in sorted(whole)]


def assert_choices_close(got: list[dict], want: list[dict]) -> None:
    """Same text, tokens and offsets; logprobs (null where the colocated one has null) and
    top maps equal to 1e-4."""
    assert [c["text"] for c in got] == [c["text"] for c in want]
    for g, w in zip(got, want, strict=True):
        if w["logprobs"] is None:
            assert g["logprobs"] is None
            continue
        g_lp, w_lp = g["logprobs"], w["logprobs"]
        assert g_lp["tokens"] == w_lp["tokens"] and g_lp["text_offset"] == w_lp["text_offset"]
        assert [v is None for v in g_lp["token_logprobs"]] == [
            v is None for v in w_lp["token_logprobs"]
        ]
        assert g_lp["token_logprobs"][1:] == pytest.approx(w_lp["token_logprobs"][1:], abs=1e-4)
        assert g_lp["top_logprobs"][0] is w_lp["top_logprobs"][0] is None
        for g_top, w_top in zip(g_lp["top_logprobs"][1:], w_lp["top_logprobs"][1:], strict=True):
            assert g_top == pytest.approx(w_top, abs=1e-4)


@pytest.mark.parametrize("body", ECHO_BODIES)
def test_echo_equals_colocated_with_the_prefill_servers_prompt_logprobs(router, tiny_server, body):
    """Only prefill computes the prompt's logprobs: the router puts them into decode's
    echoed answer, streamed or not, so it equals the colocated server's."""
    body = {"model": "tiny-random", "max_tokens": 5, "temperature": 0, **body}
    url = "/v1/completions"
    want = post(tiny_server.url + url, body).json()["choices"]
    assert_choices_close(post(router.url + url, body).json()["choices"], want)
    assert_choices_close(streamed_choices(streamed(router.url + url, body)), want)


@pytest.mark.parametrize("stop_at", [0, 1], ids=["prefills_token", "decodes_token"])
def test_a_stop_token_ends_the_answer_as_on_one_server(router, tiny_server, stop_at):
    """Prefill samples token 0, decode the rest: a stop token from either leg ends the
    answer, counted but left out of the text, as on the colocated server."""
    body = {"prompt": "Once upon", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    ids = post(tiny_server.url + "/generate", {"text": "Once upon", "sampling_params": GREEDY})
    body["stop_token_ids"] = [ids.json()["output_ids"][stop_at]]
    url = "/v1/completions"
    want = post(tiny_server.url + url, body).json()
    got = post(router.url + url, body).json()
    assert got["choices"][0] == want["choices"][0] and got["usage"] == want["usage"]
    assert want["choices"][0]["finish_reason"] == "stop"
    assert want["choices"][0]["stop_reason"] == body["stop_token_ids"][0]
    assert want["usage"]["completion_tokens"] == stop_at + 1
    # the text before the stop token (/generate, as max_tokens must be at least 1)
    params = {"max_new_tokens": stop_at, "temperature": 0, "ignore_eos": True}
    before = post(router.url + "/generate", {"text": "Once upon", "sampling_params": params})
    assert want["choices"][0]["text"] == before.json()["text"]
    assert stream_text(streamed(router.url + url, body), "text") == {0: want["choices"][0]["text"]}


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions"])
def test_stop_reason_names_the_stop_string_or_id_that_ended_the_answer(router, tiny_server, url):
    """vLLM's `stop_reason` (the stop string or stop_token_ids id; null at EOS or length)
    and SGLang's `matched_stop` (EOS id included), whole and streamed, on one server and
    through PD alike: both were missing."""
    prompt = {"prompt": "Once upon"} if url == "/v1/completions" else {"messages": MESSAGES}
    greedy = {**prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    answer = post(tiny_server.url + url, greedy).json()["choices"][0]
    text = answer["text"] if "text" in answer else answer["message"]["content"]
    stop = text[2:4]
    assert len(stop) == 2 and text.find(stop) == 2, text
    cases = [
        ({"stop": ["zzzz", stop]}, "stop", stop, stop),
        ({"max_tokens": 2}, "length", None, None),
        ({"ignore_eos": False, "logit_bias": {"2": 100}}, "stop", None, 2),  # EOS: id 2
    ]
    for extra, reason, stop_reason, matched in cases:
        for server in (tiny_server, router):
            body = {**greedy, **extra}
            whole = post(server.url + url, body).json()["choices"][0]
            last = streamed(server.url + url, body)[-1]["choices"][0]
            for choice in (whole, last):
                got = {k: choice.get(k) for k in ("finish_reason", "stop_reason", "matched_stop")}
                assert got == {
                    "finish_reason": reason,
                    "stop_reason": stop_reason,
                    "matched_stop": matched,
                }, (server.url, extra)


def test_seeded_samples_usage_and_logprobs_equal_colocated(router, tiny_server):
    """Each of n seeded samples (seed + i) comes out of PD as out of one server: prefill's
    first token and decode's rest follow the same seed; usage and logprobs agree too."""
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3}
    body |= {"logprobs": True, "top_logprobs": 1, "ignore_eos": True}
    url = "/v1/chat/completions"
    # The prompt cached on both first: with cold caches usage's cached_tokens depends on
    # scheduling (colocated prefills the n samples in one step, none cached; PD's prefill
    # may take them in turn, the later ones from the cache), not on PD.
    for base in (tiny_server.url, router.url):
        post(base + url, {**body, "n": 1, "max_tokens": 1})
    want = post(tiny_server.url + url, body).json()
    got = post(router.url + url, body).json()
    assert want["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert chat_text(got) == chat_text(want) and len(set(chat_text(want))) == 3
    assert got["usage"] == want["usage"]
    for g, w in zip(got["choices"], want["choices"], strict=True):
        tokens = [t["token"] for t in w["logprobs"]["content"]]
        assert [t["token"] for t in g["logprobs"]["content"]] == tokens
        assert [t["logprob"] for t in g["logprobs"]["content"]] == pytest.approx(
            [t["logprob"] for t in w["logprobs"]["content"]], abs=1e-4
        )
    options = {"stream_options": {"include_usage": True}}
    events = streamed(router.url + url, {**body, **options})
    assert stream_text(events, "delta") == dict(enumerate(chat_text(want)))
    assert events[-1]["usage"] == want["usage"]


@pytest.mark.parametrize("stream", [False, True])
def test_errors_through_the_router_keep_the_servers_openai_shape(router, tiny_server, stream):
    """A worker's refusal keeps its `type` and `param` (the router adds `worker`); the
    router's own refusals have the same four fields; neither is a 200 stream."""
    url = "/v1/chat/completions"
    body = {"messages": MESSAGES, "max_tokens": 2, "stream": stream}
    # vLLM refuses stream_options without stream: true; with it, they are options.
    options = {"stream_options": {"include_usage": True}}
    refused_options = [] if stream else [(options, 400, "invalid_request_error", "stream_options")]
    for wrong, status, kind, param in [
        *refused_options,
        ({"model": "gpt-4o"}, 404, "NotFoundError", "model"),
        (
            {"response_format": {"type": "json_object"}},
            400,
            "invalid_request_error",
            "response_format",
        ),
        (  # a 500 'router error: TypeError' (the router joined the parts' text)
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            400,
            "invalid_request_error",
            "messages[0].content[0].text",
        ),
        (
            {"max_tokens": "x", "max_completion_tokens": 2},
            400,
            "invalid_request_error",
            "max_tokens",
        ),
    ]:
        want = requests.post(tiny_server.url + url, json={**body, **wrong}, timeout=60)
        got = requests.post(router.url + url, json={**body, **wrong}, timeout=60)
        assert got.status_code == want.status_code == status, got.text
        error = got.json()["error"]
        assert {k: error[k] for k in want.json()["error"]} == want.json()["error"]
        assert error["type"] == kind and error["param"] == param and error["worker"]["role"]
    own = requests.post(router.url + url, json={**body, "n": 0}, timeout=60)
    assert own.status_code == 400
    assert own.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "param": "n",
        "code": 400,
    }


@pytest.mark.parametrize("stream", [False, True])
def test_the_clients_request_id_comes_back_through_real_servers(router, stream):
    """Whole, streamed and refused (by the servers themselves) alike; the legs' own echoes of
    the header (the servers answer with it too) do not double it."""
    body = {"messages": MESSAGES, "max_tokens": 2, "stream": stream}
    for extra, status in [({}, 200), ({"response_format": {"type": "json_object"}}, 400)]:
        with requests.post(
            router.url + "/v1/chat/completions",
            json={**body, **extra},
            headers={"X-Request-Id": f"pd-{stream}-{status}"},
            stream=stream,
            timeout=60,
        ) as resp:
            assert resp.status_code == status, resp.text
            assert resp.headers["X-Request-Id"] == f"pd-{stream}-{status}"
            assert resp.raw.headers.getlist("X-Request-Id") == [f"pd-{stream}-{status}"]


def test_a_clients_rid_refused_on_one_leg_does_not_abort_the_request_holding_it(router, pd_pair):
    """A client's `rid` that other requests hold on both servers: prefill refuses the new
    request's leg, and the router's abort of its decode leg named that rid alone, so decode
    stopped the request holding it there, a stream cut short with finish_reason `abort`.
    The router's aborts name each leg's room, and a server aborts only that room's rid."""
    prefill, decode = pd_pair
    body = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    body["rid"] = "rid-held-twice"
    url = router.url + "/v1/completions"
    load = lambda: http_json("GET", prefill.url + "/get_load")[1][0]  # noqa: E731
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=60) as held:
        lines = held.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: {")  # on decode now
        wait_until(lambda: load()["num_inflight_reqs"] == 0, 10, "its prefill leg's end")
        # The rid held on prefill too: a leg whose decode never asks for its KV.
        leg = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port}
        with ThreadPoolExecutor(1) as pool:
            on_prefill = pool.submit(
                requests.post, prefill.url + "/v1/completions",
                json={**leg, "bootstrap_room": 4242}, timeout=60,
            )  # fmt: skip
            wait_until(lambda: load()["num_inflight_reqs"] == 1, 10, "the rid on prefill")
            refused = requests.post(url, json={**body, "max_tokens": 4}, timeout=60)
            events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
            requests.post(prefill.url + "/abort_request", json={"rid": body["rid"]}, timeout=10)
            on_prefill.result()
    assert refused.status_code == 400, refused.text
    assert "already in flight" in refused.json()["error"]["message"]
    choices = [c for e in events for c in e["choices"]]
    assert choices[-1]["finish_reason"] == "length", choices[-1]
    wait_idle([prefill.url, decode.url])


def test_a_compressed_body_or_one_with_a_byte_order_mark_is_read_as_the_servers_read_it(
    router, tiny_server
):
    """They were a 400 'JSON is malformed' through the router, served colocated."""
    body = json.dumps(GENERATE_BODIES[0]).encode()
    for data, coding in [
        (gzip.compress(body), "gzip"),
        (zlib.compress(body), "deflate"),
        (codecs.BOM_UTF8 + body, "identity"),
    ]:
        headers = {"Content-Encoding": coding}
        want = requests.post(tiny_server.url + "/generate", data=data, headers=headers, timeout=60)
        got = requests.post(router.url + "/generate", data=data, headers=headers, timeout=60)
        assert got.status_code == want.status_code == 200, (coding, got.text, want.text)
        assert got.json()["output_ids"] == want.json()["output_ids"]


@pytest.mark.parametrize("coding", ["br", "zstd"])
def test_a_body_coded_br_or_zstd_is_the_same_json_415_from_router_and_servers(
    router, tiny_server, pd_pair, coding
):
    """aiohttp's parser answered the servers' with a plain-text 400 before any handler ran
    (the router's was a JSON 400): now every one is a JSON 415 naming what is accepted."""
    body = json.dumps(GENERATE_BODIES[0]).encode()
    prefill, decode = pd_pair
    answers = [
        requests.post(f"{url}/generate", data=body, headers={"Content-Encoding": coding})
        for url in (router.url, tiny_server.url, prefill.url, decode.url)
    ]
    for resp in answers:
        assert resp.status_code == 415, (resp.url, resp.text)
        assert resp.headers["Accept-Encoding"] == "gzip, deflate, identity", resp.headers
        assert resp.json() == answers[0].json(), resp.url
    message = answers[0].json()["error"]["message"]
    assert message.startswith(f"Content-Encoding {coding} is not supported"), message
    assert "gzip, deflate or identity" in message


def test_openai_client_through_the_router(router, tiny_server, pd_pair):
    def ask(base_url: str, stream: bool) -> str:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=60)
        kwargs = dict(model="tiny-random", messages=MESSAGES, max_tokens=8, temperature=0)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = client.chat.completions.create(**kwargs, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    want = ask(tiny_server.url, False)
    assert ask(router.url, False) == want and ask(router.url, True) == want
    models = openai.OpenAI(base_url=router.url + "/v1", api_key="none").models.list()
    assert models.data[0].id == "tiny-random"
    wait_idle([pd_pair[0].url, pd_pair[1].url])


def test_plain_mode_forwards_to_a_colocated_server(tiny_server):
    """`--worker URL`: no PD fields; the answer is the colocated server's own."""
    with start_router(router_args(workers=[tiny_server.url])) as plain:
        body = GENERATE_BODIES[0]
        assert (
            post(plain.url + "/generate", body).json()["output_ids"]
            == post(tiny_server.url + "/generate", body).json()["output_ids"]
        )
        events = streamed(
            plain.url + "/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 4, "temperature": 0},
        )
        assert events and events[0]["object"] == "chat.completion.chunk"
        body = {"messages": MESSAGES, "max_tokens": 2, "top_logprobs": 2}
        refused = requests.post(plain.url + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "top_logprobs"


def test_tokenize_routes_and_retrieve_model_on_every_role_and_through_the_router(
    router, tiny_server, pd_pair
):
    """vLLM's /tokenize and /detokenize and OpenAI's GET /v1/models/{model} (404s before):
    prefill, decode and colocated servers answer alike, and the router relays a decode
    server's answer, errors and gzip bodies included."""
    prefill, decode = pd_pair
    chat = {"messages": MESSAGES, "return_token_strs": True}
    want = post(tiny_server.url + "/tokenize", chat).json()
    text = post(tiny_server.url + "/detokenize", {"tokens": want["tokens"]}).json()
    for url in (prefill.url, decode.url, router.url):
        assert post(url + "/tokenize", chat).json() == want, url
        assert post(url + "/detokenize", {"tokens": want["tokens"]}).json() == text, url
        card = requests.get(url + "/v1/models/tiny-random", timeout=60)
        assert card.status_code == 200 and card.json()["id"] == "tiny-random", card.text
        for method, path, body, status, param in [
            ("GET", "/v1/models/org/none", None, 404, "model"),
            ("POST", "/tokenize", {"prompt": "x", "model": "none"}, 404, "model"),
            ("POST", "/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ]:
            resp = requests.request(method, url + path, json=body, timeout=60)
            assert resp.status_code == status and resp.json()["error"]["param"] == param, resp.text
    data = gzip.compress(json.dumps(chat).encode())
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    got = requests.post(router.url + "/tokenize", data=data, headers=headers, timeout=60)
    assert got.status_code == 200 and got.json() == want, got.text
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
    assert client.models.retrieve("tiny-random").id == "tiny-random"
