"""A correctness sweep of PD serving across model shapes: for each small random-weight model
(one per supported family and config variant) and topology (page size, prefill and decode DP
sizes), the greedy tokens of a colocated server and of a router + prefill + decode cluster
(`pdserve up`) are compared with each other and with transformers' own `generate`, and every
server must end the load idle (no used pages, running requests or rooms; every cached page
evictable). Too slow for CI (about a minute a shape on two CPU cores); run by hand:

    python -m pdserve.bench.shapes_sweep [--shapes qwen3-odd mixtral] [--server-args '...']

Requests: distinct prompts of lengths around the page size, prompts sharing a long prefix
(both prefix caches and the delta KV transfer), a batched /generate, /v1/completions with
n=2, a stream, one new token, a long answer, a prompt past the chunk size, and all of them
at once; the whole set goes through PD twice (the second pass hits both caches).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import requests
import torch

from pdserve.bench.launch import launched
from pdserve.engine.tiny_random import EOS_TOKEN_ID, build_tokenizer
from pdserve.procs import free_port

_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.3,  # peaky logits: greedy choices win by wide margins
    bos_token_id=1,
    eos_token_id=EOS_TOKEN_ID,
)
_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# name -> (transformers family prefix, config fields, bias tensors made non-zero)
SHAPES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "llama-gqa-llama3": ("Llama", dict(num_key_value_heads=1, rope_scaling=_LLAMA3), ()),
    "llama-mha-bias-linear": (
        "Llama",
        dict(
            num_key_value_heads=4,
            num_hidden_layers=3,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
        ("proj",),
    ),
    "llama-hd8": ("Llama", dict(num_attention_heads=8, head_dim=8), ()),
    "qwen2-bias": ("Qwen2", dict(tie_word_embeddings=True), ("q_proj", "k_proj", "v_proj")),
    "qwen3-hd32": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False), ()),
    "qwen3-bias": ("Qwen3", dict(attention_bias=True, tie_word_embeddings=False), ("proj",)),
    "qwen3-odd": (
        "Qwen3",
        dict(
            hidden_size=72,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=12,
            intermediate_size=88,
            num_hidden_layers=3,
            tie_word_embeddings=True,
        ),
        (),
    ),
    "mistral": ("Mistral", dict(sliding_window=None, tie_word_embeddings=False), ()),
    "mistral-hd32": ("Mistral", dict(head_dim=32, sliding_window=None), ()),
    "qwen3-moe": (
        "Qwen3Moe",
        dict(
            num_hidden_layers=3,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            tie_word_embeddings=True,
        ),
        (),
    ),
    "mixtral": (
        "Mixtral",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        (),
    ),
}
# name -> (page size, prefill DP, decode DP)
TOPOLOGIES: dict[str, tuple[int, int, int]] = {
    "llama-gqa-llama3": (16, 2, 2),
    "llama-mha-bias-linear": (7, 1, 1),
    "llama-hd8": (64, 1, 2),
    "qwen2-bias": (1, 1, 1),
    "qwen3-hd32": (5, 2, 1),
    "qwen3-bias": (16, 1, 2),
    "qwen3-odd": (3, 2, 2),
    "mistral": (16, 1, 2),
    "mistral-hd32": (2, 1, 1),
    "qwen3-moe": (5, 1, 1),
    "mixtral": (16, 2, 2),
}
NEW_TOKENS = 8
LONG_NEW_TOKENS = 40
TIMEOUT_S = 120.0


def build_model(name: str, path: str) -> Any:
    """Save the shape's random model (safetensors) with tiny-random's tokenizer to `path`;
    returns the transformers model, in eval mode."""
    import transformers

    family, fields, biases = SHAPES[name]
    vocab_size = build_tokenizer(path)
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(sorted(SHAPES).index(name))
    model = model_cls(config_cls(**{**_SHAPE, "vocab_size": vocab_size, **fields}))
    with torch.no_grad():  # norms start at one and biases at zero: make them matter
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
            elif param_name.endswith("bias") and any(b in param_name for b in biases):
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": EOS_TOKEN_ID, "bos_token_id": 1, "pad_token_id": 0}, f)
    return model.eval()


def workload(page_size: int, seed: int = 11) -> dict[str, list[int]]:
    """Named prompts: distinct ones around the page size, then four sharing a prefix of
    four pages and a bit (the last is the prefix alone), and one past a small chunk size."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, 250) for _ in range(n)]

    lens = sorted({max(1, page_size - 1), page_size, page_size + 1, 2 * page_size + 3, 40})
    prompts = {f"d{i}": ids(n) for i, n in enumerate(lens)}
    prefix = ids(4 * page_size + 3)
    for i, n in enumerate((1, page_size, 2 * page_size + 1, 0)):
        prompts[f"s{i}"] = prefix + ids(n)
    prompts["big"] = ids(150)
    return prompts


def reference(model: Any, ids: list[int], num_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy tokens, past EOS as the servers' `ignore_eos` goes (EOS may be
    chosen, it does not stop; `min_new_tokens` would forbid it instead)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=num_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    tokens = out[0, len(ids) :].tolist()
    assert len(tokens) == num_tokens, "transformers stopped early"
    return tokens


def _sampling(num_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    return {"max_new_tokens": num_tokens, "temperature": 0, "ignore_eos": True}


def _post(url: str, path: str, body: dict) -> Any:
    resp = requests.post(url + path, json=body, timeout=TIMEOUT_S)
    if resp.status_code != 200:
        raise RuntimeError(f"{url}{path}: {resp.status_code} {resp.text[:300]}")
    return resp.json()


def _generate(url: str, ids: list[int], num_tokens: int = NEW_TOKENS) -> dict:
    return _post(url, "/generate", {"input_ids": ids, "sampling_params": _sampling(num_tokens)})


def _stream(url: str, ids: list[int]) -> list[int]:
    body = {"input_ids": ids, "sampling_params": _sampling(), "stream": True}
    last = None
    with requests.post(url + "/generate", json=body, timeout=TIMEOUT_S, stream=True) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                last = json.loads(line[len(b"data: ") :])
    return last["output_ids"] if last else []


def answers(url: str, prompts: dict[str, list[int]]) -> tuple[dict[str, Any], list[int]]:
    """(name -> output ids or text, decode_cached_tokens of the shared-prefix prompts)."""
    out: dict[str, Any] = {}
    decode_cached = []
    for name, ids in prompts.items():
        answer = _generate(url, ids)
        out[name] = answer["output_ids"]
        if name.startswith("s"):
            decode_cached.append(answer["meta_info"].get("decode_cached_tokens", 0))
    batch = [prompts["d0"], prompts["d1"], prompts["d2"]]
    for i, answer in enumerate(
        _post(url, "/generate", {"input_ids": batch, "sampling_params": _sampling()})
    ):
        out[f"batch{i}"] = answer["output_ids"]
    out["text_d3"] = _generate(url, prompts["d3"])["text"]
    body = {"prompt": prompts["d3"], "n": 2, "max_tokens": NEW_TOKENS, "temperature": 0}
    for i, choice in enumerate(
        _post(url, "/v1/completions", {**body, "ignore_eos": True})["choices"]
    ):
        out[f"n{i}"] = choice["text"]
    out["stream"] = _stream(url, prompts["s2"])
    out["one"] = _generate(url, prompts["d2"], 1)["output_ids"]
    out["long"] = _generate(url, prompts["d1"], LONG_NEW_TOKENS)["output_ids"]
    names = list(prompts) * 2
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for i, answer in enumerate(pool.map(lambda n: _generate(url, prompts[n]), names)):
            out[f"concurrent{i}:{names[i]}"] = answer["output_ids"]
    return out, decode_cached


def expected(model: Any, prompts: dict[str, list[int]], colocated: dict[str, Any]) -> dict:
    """What `answers` must return: transformers' tokens, and the colocated server's text
    for the text fields (n=2 choices equal the greedy answer's text)."""
    want = {name: reference(model, ids) for name, ids in prompts.items()}
    for i in range(3):
        want[f"batch{i}"] = want[f"d{i}"]
    want["text_d3"] = want["n0"] = want["n1"] = colocated["text_d3"]
    want["stream"] = want["s2"]
    want["one"] = want["d2"][:1]
    want["long"] = reference(model, prompts["d1"], LONG_NEW_TOKENS)
    for i, name in enumerate(list(prompts) * 2):
        want[f"concurrent{i}:{name}"] = want[name]
    return want


def not_idle(urls: list[str], timeout_s: float = 10.0) -> dict[str, Any]:
    """Ranks still holding pages, requests or rooms (or pinned cached pages) after
    `timeout_s`; empty once every server is idle."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = {}
        for url in urls:
            for rank, load in enumerate(requests.get(url + "/get_load", timeout=10).json()):
                held = (load["num_used_pages"], load["num_running_reqs"])
                rooms = load.get("num_disagg_rooms", 0)
                pinned = load.get("num_cached_pages", 0) != load.get("num_evictable_pages", 0)
                if any(held) or rooms or pinned:
                    busy[f"{url}#{rank}"] = load
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)  # polling a condition with a deadline


@contextlib.contextmanager
def servers(path: str, shape: str, server_args: str) -> Iterator[tuple[str, str, list[str]]]:
    """(colocated URL, router URL, every server's URL) of the shape's topology."""
    page_size, prefill_dp, decode_dp = TOPOLOGIES[shape]
    common = f"--model-path {path} --page-size {page_size}"
    colocated, router, prefill, decode = (free_port() for _ in range(4))
    colocated_url, router_url = f"http://127.0.0.1:{colocated}", f"http://127.0.0.1:{router}"
    serve = f"pdserve serve --host 127.0.0.1 --port {colocated} {common} {server_args}"
    up = (
        f"pdserve up --port {router} --prefill-port {prefill} --decode-port {decode} "
        f"--prefill-dp {prefill_dp} --decode-dp {decode_dp} {common} "
        f"--server-args {shlex.quote(server_args)}"
    )
    urls = [colocated_url, f"http://127.0.0.1:{prefill}", f"http://127.0.0.1:{decode}"]
    with launched(serve, colocated_url, TIMEOUT_S), launched(up, router_url, TIMEOUT_S):
        yield colocated_url, router_url, urls


def sweep_shape(shape: str, server_args: str) -> dict[str, Any]:
    """One shape: its outcome row."""
    with tempfile.TemporaryDirectory(prefix=f"pdserve-shape-{shape}-") as path:
        model = build_model(shape, path)
        prompts = workload(TOPOLOGIES[shape][0])
        with servers(path, shape, server_args) as (colocated_url, router_url, urls):
            colocated, _ = answers(colocated_url, prompts)
            want = expected(model, prompts, colocated)
            runs = {"colocated": colocated}
            runs["pd"], first_cached = answers(router_url, prompts)
            runs["pd-again"], again_cached = answers(router_url, prompts)
            busy = not_idle(urls)
    mismatches = [
        f"{run}:{name}: {got[name]} != {tokens}"
        for run, got in runs.items()
        for name, tokens in want.items()
        if got[name] != tokens
    ]
    return {
        "shape": shape,
        "topology": "page {}, P{} D{}".format(*TOPOLOGIES[shape]),
        "requests": len(want) * len(runs),
        "mismatches": mismatches,
        "decode_cached_tokens": [first_cached, again_cached],
        "not_idle": busy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--server-args", default="", help="more flags for every server")
    args = parser.parse_args(argv)
    failed = 0
    for shape in args.shapes:
        row = sweep_shape(shape, args.server_args)
        ok = not row["mismatches"] and not row["not_idle"]
        failed += not ok
        print(
            f"{row['shape']:24} {row['topology']:18} {row['requests']:4} requests  "
            f"{'identical' if ok else 'FAILED'}  decode_cached {row['decode_cached_tokens']}",
            flush=True,
        )
        for line in row["mismatches"]:
            print("   mismatch", line)
        for where, load in row["not_idle"].items():
            print("   not idle", where, load)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
