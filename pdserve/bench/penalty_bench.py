"""Time of the penalize step for B penalized rows of L tokens each: their ids kept on the
device, a step uploading only the newest (the engine's path), against the path before it
(each row's whole prompt and output copied to tuples, flattened and uploaded every step),
same process, same run, same requests; both results checked equal.

Run: `python -m pdserve.bench.penalty_bench [--rows 32] [--output-len 4096] [--device cpu]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from pdserve.engine.host_copy import host_to_device
from pdserve.engine.penalties import penalize, penalty_spec
from pdserve.engine.request import Request, SamplingParams

EOS = frozenset({2})


def _scatter_pairs(target: torch.Tensor, row_ids: list[int], token_ids: list[int]) -> None:
    if not token_ids:
        return
    device = target.device
    rows, tokens = host_to_device(row_ids, device), host_to_device(token_ids, device)
    target.index_put_((rows, tokens), target.new_ones(1).expand(len(token_ids)), accumulate=True)


def _flattened(rows: list[tuple[int, ...]]) -> tuple[list[int], list[int]]:
    return [p for p, ids in enumerate(rows) for _ in ids], [t for ids in rows for t in ids]


def full_rebuild_penalize(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """The baseline: the previous path for rows with penalties but no token in flight and
    no min_new_tokens; every row's whole history goes through Python lists each step."""
    device = logits.device
    prompts = [tuple(r.prompt_ids) if r.sampling.repetition_penalty != 1 else () for r in reqs]
    outputs = [tuple(r.output_ids) for r in reqs]
    counts = torch.zeros(len(reqs), logits.shape[-1], device=device)
    _scatter_pairs(counts, *_flattened(outputs))
    seen = (counts > 0).float()
    _scatter_pairs(seen, *_flattened(prompts))
    params = [r.sampling for r in reqs]
    penalty = host_to_device([p.repetition_penalty for p in params], device, torch.float32)
    penalty = penalty[:, None]
    picked = torch.where(logits > 0, logits / penalty, logits * penalty)
    picked = torch.where(seen > 0, picked, logits)
    frequency = host_to_device([p.frequency_penalty for p in params], device, torch.float32)
    presence = host_to_device([p.presence_penalty for p in params], device, torch.float32)
    picked = picked - frequency[:, None] * counts - presence[:, None] * (counts > 0)
    index = host_to_device(list(range(len(reqs))), device)
    return logits.index_copy(0, index, picked)


def on_device_penalize(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """The engine's path (specs built per step, as the sampler does)."""
    return penalize(logits, [penalty_spec(r, 0, EOS) for r in reqs], None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(
    path: Callable[[torch.Tensor, list[Request]], torch.Tensor],
    logits: torch.Tensor,
    reqs: list[Request],
) -> tuple[torch.Tensor, float, float]:
    """The path's result, host ms until it returned and ms until the device was done too."""
    device = logits.device
    _synchronize(device)
    started = time.perf_counter()
    result = path(logits, reqs)
    returned = time.perf_counter()
    _synchronize(device)
    return result, 1e3 * (returned - started), 1e3 * (time.perf_counter() - started)


def make_requests(args: argparse.Namespace, output_len: int) -> list[Request]:
    rng = random.Random(0)
    params = SamplingParams(
        temperature=0.0, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.1
    )
    return [
        Request(
            f"r{i}",
            [rng.randrange(args.vocab) for _ in range(args.prompt_len)],
            params,
            output_ids=[rng.randrange(args.vocab) for _ in range(output_len)],
        )
        for i in range(args.rows)
    ]


Medians = dict[str, tuple[float, float]]  # path -> (host ms, total ms) per step


def measure(args: argparse.Namespace, output_len: int) -> Medians:
    """Both paths on the same requests, each step adding one output id to every row."""
    reqs = make_requests(args, output_len)
    paths = {"full rebuild": full_rebuild_penalize, "on device": on_device_penalize}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    torch.manual_seed(0)
    for step in range(args.steps + 1):  # step 0 (the one-off upload, warm-up) not timed
        logits = torch.randn(args.rows, args.vocab, device=torch.device(args.device))
        results = {}
        for name, path in paths.items():
            results[name], host_ms, total_ms = timed_ms(path, logits, reqs)
            if step:
                times[name].append((host_ms, total_ms))
        if not torch.equal(results["full rebuild"], results["on device"]):
            raise SystemExit(f"output {output_len}, step {step}: the two paths disagree")
        for req, token_id in zip(reqs, logits.argmax(dim=-1).tolist(), strict=True):
            req.output_ids.append(token_id)
    return {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="penalized rows per step")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt ids per row")
    parser.add_argument(
        "--output-len", type=int, nargs="+", default=[1024, 4096], help="output ids per row"
    )
    parser.add_argument("--vocab", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"device {args.device}, {args.threads} thread(s): {args.rows} rows, prompt "
        f"{args.prompt_len} ids, vocab {args.vocab}; ms per step, median of {args.steps} "
        "steps (results equal every step); ratio = full rebuild / on device"
    )
    print(f"{'output ids':>10} {'path':>13} {'host ms':>9} {'total ms':>9}")
    for output_len in args.output_len:
        medians = measure(args, output_len)
        for name, (host_ms, total_ms) in medians.items():
            print(f"{output_len:10d} {name:>13} {host_ms:9.2f} {total_ms:9.2f}")
        (old_host, old_total), (new_host, new_total) = medians.values()
        print(
            f"{output_len:10d} {'ratio':>13} {old_host / new_host:8.2f}x {old_total / new_total:8.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
