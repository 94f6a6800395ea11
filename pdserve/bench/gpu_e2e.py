"""End to end on one GPU: a colocated server against router + prefill + decode (KV over
CUDA IPC), random-weight Llama-3.2-1B shape in bf16. Checks greedy token identity, then runs
`pdserve bench` against the colocated server, the same server behind a router, and 1P1D, and
compares 1P1D with both. `python -m pdserve.bench.gpu_e2e --out DIR`;
`--multiturn` instead runs the multi-turn workload on 1P1D with the prefix cache on and off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from pdserve.bench.gpu_bench import SHAPES

GPU_ARGS = ["--device", "cuda", "--dtype", "bfloat16"]


def build_model_dir(shape: str, path: str, tokenizer_vocab: bool = False) -> str:
    """Random bf16 weights of the shape, with the tiny-random tokenizer (ids < 506). With
    `tokenizer_vocab` the model's vocabulary is the tokenizer's, so every token it answers
    is a valid prompt token of the next turn (multi-turn)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pdserve.engine.loader import resolve_model_dir

    tokenizer_dir = resolve_model_dir("tiny-random")
    config = dict(SHAPES[shape])
    if tokenizer_vocab:
        config["vocab_size"] = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tokenizer_dir, name), path)
    return path


def _get(url: str, timeout_s: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except OSError:
        return 0


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def start(
    argv: list[str],
    ready_url: str,
    log_path: str,
    timeout_s: float = 400,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout_s
    while _get(ready_url) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{argv[0]} not ready; see {log_path}")
        time.sleep(0.5)  # readiness polling with a deadline
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def token_check(colocated: str, router: str, num_prompts: int, seed: int) -> dict:
    """Greedy tokens of `router` against `colocated` on prompts neither has seen. Each check
    takes its own `seed`: a prompt the colocated server saw before is served from its prefix
    cache, whose prefill (only the tail computed, attending to cached bf16 KV) differs from a
    whole prefill in the last bits, which greedy decoding of random weights can amplify."""
    rng = random.Random(seed)
    lengths = [1, 15, 16, 17, 100, 511, 512, 700][:num_prompts] + [64] * max(0, num_prompts - 8)
    same, differ = 0, []
    for n in lengths:
        body = {
            "input_ids": [rng.randrange(3, 500) for _ in range(n)],
            "sampling_params": {"max_new_tokens": 32, "temperature": 0},
        }
        a = _post(colocated + "/generate", body)["output_ids"]
        b = _post(router + "/generate", body)["output_ids"]
        same += a == b
        if a != b:  # where they part: the first token is prefill's, the rest decode's
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            differ.append({"prompt_len": n, "first_differing_token": at, "a": a, "b": b})
    return {"prompts": len(lengths), "identical": same, "differing": differ}


def bench(base_url: str, label: str, out_dir: str, args, num_prompts: int = 0) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve",
            "bench",
            "--base-url",
            base_url,
            "--endpoint",
            "generate",
            "--num-prompts",
            str(num_prompts or args.num_prompts),
            "--random-input-len",
            "512",
            "--random-output-len",
            "128",
            "--max-concurrency",
            str(args.max_concurrency),
            "--request-rate",
            "inf",
            "--warmup-requests",
            "4",
            "--no-progress",
            "--label",
            label,
            "--output",
            os.path.join(out_dir, f"{label}.json"),
        ],
        check=False,
    )


MULTITURN = [
    "--dataset-name", "multiturn", "--num-conversations", "8", "--num-turns", "4",
    "--system-prompt-len", "512", "--user-len", "64", "--random-output-len", "64",
    "--think-time-s", "0.2", "--conversation-stagger-s", "0.1", "--warmup-requests", "2",
    "--temperature", "0", "--no-progress",
    "--extra-body", '{"return_logprob": true, "top_logprobs_num": 2}',
]  # fmt: skip


def multiturn(model_dir: str, out_dir: str, server_args: list[str]) -> None:
    """1P1D over CUDA IPC, prefix cache on against --disable-radix-cache, one after the
    other on the same GPU; `pdserve bench compare` prints the ratios."""
    for label, extra in (("cache-off", ["--disable-radix-cache"]), ("cache-on", [])):
        up_args = " ".join([*GPU_ARGS, "--transfer-backend", "cuda_ipc", *server_args, *extra])
        proc = start(
            ["up", "--model-path", model_dir, "--port", "32000", "--prefill-port", "32001",
             "--decode-port", "32002", "--server-args", up_args],
            "http://127.0.0.1:32000/readiness",
            os.path.join(out_dir, f"up-{label}.log"),
        )  # fmt: skip
        try:
            subprocess.run(
                [sys.executable, "-m", "pdserve", "bench", *MULTITURN,
                 "--base-url", "http://127.0.0.1:32000",
                 "--metrics-urls", "http://127.0.0.1:32001", "http://127.0.0.1:32002",
                 "--label", label, "--output", os.path.join(out_dir, f"mt-{label}.json")],
                check=False,
            )  # fmt: skip
        finally:
            stop(proc)
    subprocess.run(
        [sys.executable, "-m", "pdserve", "bench", "compare",
         os.path.join(out_dir, "mt-cache-off.json"), os.path.join(out_dir, "mt-cache-on.json")],
        check=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_e2e_out")
    parser.add_argument("--shape", default="llama3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument(
        "--warm-prompts", type=int, default=32, help="prompts of each target's unmeasured pass"
    )
    parser.add_argument("--multiturn", action="store_true", help="prefix cache on vs off")
    parser.add_argument(
        "--server-args", default="",
        help="more arguments for every server, e.g. '--overlap-schedule on'",
    )  # fmt: skip
    parser.add_argument(
        "--pd-env", action="append", default=[], metavar="KEY=VALUE",
        help="also run a second 1P1D cluster with this in its environment (repeatable; e.g. "
        "PDSERVE_CUDA_IPC_DIRECT_LAUNCH=0) and compare it with the first in the same run",
    )  # fmt: skip
    parser.add_argument(
        "--pd-up-args", default="",
        help="also run a second 1P1D cluster with these more `pdserve up` flags (e.g. "
        "'--policy kv_aware') and compare it with the first in the same run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    extra = shlex.split(args.server_args)
    if any("=" not in item for item in args.pd_env):
        parser.error(f"--pd-env takes KEY=VALUE, got {args.pd_env}")
    alt_env = dict(item.split("=", 1) for item in args.pd_env)
    alt_up_args = shlex.split(args.pd_up_args)
    alt = alt_env or alt_up_args
    os.makedirs(args.out, exist_ok=True)
    model_dir = build_model_dir(
        args.shape, tempfile.mkdtemp(prefix="pdserve-gpu-e2e-"), tokenizer_vocab=args.multiturn
    )
    if args.multiturn:
        try:
            multiturn(model_dir, args.out, extra)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
        return
    procs = []
    try:
        procs.append(
            start(
                ["serve", "--model-path", model_dir, *GPU_ARGS, *extra, "--port", "31000"],
                "http://127.0.0.1:31000/health",
                os.path.join(args.out, "colocated.log"),
            )
        )
        server_args = shlex.join([*GPU_ARGS, "--transfer-backend", "cuda_ipc", *extra])
        procs.append(
            start(
                ["up", "--model-path", model_dir, "--port", "32000", "--server-args", server_args],
                "http://127.0.0.1:32000/readiness",
                os.path.join(args.out, "up.log"),
            )
        )
        if alt:  # the same cluster with other environment variables or flags, other ports
            procs.append(
                start(
                    ["up", "--model-path", model_dir, "--port", "34000",
                     "--server-args", server_args, *alt_up_args],
                    "http://127.0.0.1:34000/readiness",
                    os.path.join(args.out, "up-alt.log"),
                    env=alt_env,
                )
            )  # fmt: skip
        # The colocated server behind a router of its own: what the router's hop costs, apart
        # from disaggregation (1P1D's tokens reach the client through a router too).
        procs.append(
            start(
                ["router", "--worker", "http://127.0.0.1:31000", "--port", "33000"],
                "http://127.0.0.1:33000/readiness",
                os.path.join(args.out, "router-colocated.log"),
            )
        )
        targets = {
            "colocated": "http://127.0.0.1:31000",
            "router-colocated": "http://127.0.0.1:33000",
            "pd": "http://127.0.0.1:32000",
        }
        if alt:
            targets["pd-alt"] = "http://127.0.0.1:34000"
        checks = {
            label: token_check(targets["colocated"], url, 8, seed)
            for seed, (label, url) in enumerate(targets.items())
            if label.startswith("pd")
        }
        # What the prefix cache alone does to tokens: the colocated server against itself,
        # each prompt new to it, then again from its cache.
        checks["colocated-cached"] = token_check(
            targets["colocated"], targets["colocated"], 8, len(targets)
        )
        print("token identity against colocated:", checks, flush=True)
        with open(os.path.join(args.out, "tokens.json"), "w") as f:
            json.dump(checks, f)
        # One unmeasured pass of the same workload each first: whichever went first used to
        # pay for the kernels the servers compile on first use (in two H100 runs the same
        # server measured second gave 1.4-1.5x its tokens/s).
        for label, url in targets.items():
            bench(url, f"warm-{label}", args.out, args, num_prompts=args.warm_prompts)
        for label, url in targets.items():
            bench(url, label, args.out, args)
        pairs = [("colocated", "pd"), ("router-colocated", "pd")]
        if alt:
            print(f"pd-alt: the same 1P1D cluster with {alt_env} {alt_up_args}", flush=True)
            pairs += [("colocated", "pd-alt"), ("pd", "pd-alt")]
        for baseline, label in pairs:
            subprocess.run(
                [sys.executable, "-m", "pdserve", "bench", "compare",
                 os.path.join(args.out, f"{baseline}.json"),
                 os.path.join(args.out, f"{label}.json")],
                check=False,
            )  # fmt: skip
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
