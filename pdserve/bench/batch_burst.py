"""One large batch in one request, through a local PD cluster and a colocated server in the
same run: `python -m pdserve.bench.batch_burst --num-prompts 2000`. A batch of more prompts
than decode's --max-running-requests queues on decode (docs/protocol.md 5.2) while prefill
waits for its page lists; the ratio to a colocated server (the baseline) shows what that
queue costs. Prints one JSON line per setup and the PD/colocated ratio.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
import urllib.error
import urllib.request
from typing import Any

from pdserve.bench.launch import launched
from pdserve.procs import free_port

READY_TIMEOUT_S = 180.0


def run_batch(base_url: str, num_prompts: int, max_tokens: int, timeout_s: float) -> dict:
    """POST one /v1/completions batch; its status, seconds and choices (or error)."""
    body = {
        "model": "tiny-random",
        "prompt": [f"prompt number {i} with a few more words" for i in range(num_prompts)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        base_url + "/v1/completions", data, {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            status = resp.status
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, json.loads(exc.read() or b"{}")
    seconds = time.perf_counter() - start
    result = {"status": status, "seconds": round(seconds, 3)}
    if status == 200:
        result["choices"] = len(answer["choices"])
    else:
        result["error"] = str(answer.get("error", answer))[:300]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model-path", default="tiny-random")
    parser.add_argument("--server-args", default="", help="more flags for every server")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="client deadline")
    args = parser.parse_args(argv)
    server_args = shlex.split(args.server_args)
    setups = {
        "colocated": ["pdserve", "serve", "--model-path", args.model_path, *server_args],
        "pd": ["pdserve", "up", "--model-path", args.model_path]
        + (["--server-args", args.server_args] if server_args else []),
    }
    results = {}
    for name, command in setups.items():
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        with launched(shlex.join([*command, "--port", str(port)]), base_url, READY_TIMEOUT_S):
            results[name] = run_batch(base_url, args.num_prompts, args.max_tokens, args.timeout_s)
        print(json.dumps({"setup": name, "num_prompts": args.num_prompts, **results[name]}))
    pd, colocated = results["pd"], results["colocated"]
    if pd["status"] == colocated["status"] == 200:
        print(f"pd / colocated seconds: {pd['seconds'] / colocated['seconds']:.2f}x")


if __name__ == "__main__":
    main()
