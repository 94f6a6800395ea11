"""`pdserve bench-engine`: the engine alone against transformers on the same weights.

Runs in the calling process; everything is measured in the same run: prefill and decode
tokens/s at each batch size, 16 concurrent requests against transformers serving them one
after another, and the batch-1 decode step against the weight-read floor (weight bytes /
memory bandwidth with the engine's torch threads: STREAM copy, and read-only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

from pdserve.config import add_arguments, check, from_args, opt

OUTPUTS = ["table", "json"]


@dataclass(frozen=True)
class EngineBenchConfig:
    models: list[str] = opt(["tiny-random", "smollm2-135m-instruct"], "models to measure")
    batch_sizes: list[int] = opt([1, 16], "concurrent requests per measurement")
    prompt_len: int = opt(
        64, "prompt tokens per request (all equal: transformers needs no padding)"
    )
    new_tokens: int = opt(32, "tokens generated per request (EOS ignored)")
    sequential_requests: int = opt(16, "requests for the concurrent-vs-one-after-another test")
    torch_threads: int = opt(1, "torch intra-op threads (both engines)")
    floor_rounds: int = opt(
        5, "rounds of (read bandwidth, batch-1 decode) for the floor ratio; median reported"
    )
    output: str = opt("table", "report format", choices=OUTPUTS)

    def __post_init__(self) -> None:
        check(bool(self.models), "--models needs at least one model")
        check(all(b > 0 for b in self.batch_sizes), "--batch-sizes must be positive")
        check(self.prompt_len > 0 and self.new_tokens > 1, "--prompt-len > 0, --new-tokens > 1")
        check(self.sequential_requests > 0, "--sequential-requests must be > 0")
        check(self.floor_rounds > 0, "--floor-rounds must be > 0")


def copy_bandwidth_gbs(num_bytes: int = 512 * 1024**2, repeats: int = 3) -> float:
    """STREAM-style copy bandwidth (bytes read + written per second) with the current torch
    threads, best of `repeats`; the convention of the GPU bench's device copy bandwidth."""
    import torch

    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * num_bytes / min(_timed(lambda: dst.copy_(src)) for _ in range(repeats)) / 1e9


def read_bandwidth_gbs(num_bytes: int = 512 * 1024**2, repeats: int = 3) -> float:
    """Read-only bandwidth (a sum over a buffer 16x the last-level cache), best of `repeats`:
    a stricter floor, since a decode step only reads its weights."""
    import torch

    buf = torch.ones(num_bytes // 4)
    buf.sum()
    return num_bytes / min(_timed(buf.sum) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _prompts(batch: int, prompt_len: int, vocab_size: int, salt: int = 0) -> list[list[int]]:
    # Ids from the middle of the vocabulary: no special tokens.
    return [
        [(31 * (i + salt) + 7 * j) % (vocab_size - 10) + 5 for j in range(prompt_len)]
        for i in range(batch)
    ]


def pdserve_run(engine, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Prefill (one step: the chunk budget covers every prompt) then decode to the end."""
    from pdserve.engine.request import Request, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(Request(f"bench-{time.monotonic_ns()}-{i}", ids, params))
    prefill_s = _timed(engine.step)
    step_s = []
    while engine.has_work():
        step_s.append(_timed(engine.step))
    batch = len(prompts)
    return {
        "prefill_tok_s": batch * len(prompts[0]) / prefill_s,
        "decode_tok_s": batch * len(step_s) / sum(step_s),
        "decode_step_ms": 1000 * statistics.median(step_s),
        "total_s": prefill_s + sum(step_s),
    }


def hf_generate_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    import torch

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        return _timed(
            lambda: model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )
        )


def hf_run(model, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Prefill from generate(max_new_tokens=1); decode from the extra time of the rest."""
    prefill_s = hf_generate_s(model, prompts, 1)
    total_s = hf_generate_s(model, prompts, new_tokens)
    batch = len(prompts)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "prefill_tok_s": batch * len(prompts[0]) / prefill_s,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s,
        "decode_step_ms": 1000 * decode_s / (new_tokens - 1),
        "total_s": total_s,
    }


def _load(model_name: str, cfg: EngineBenchConfig) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import Engine
    from pdserve.engine.loader import resolve_model_dir

    most = max(*cfg.batch_sizes, cfg.sequential_requests)
    engine = Engine.from_config(
        EngineConfig(
            model_path=model_name,
            torch_threads=cfg.torch_threads,
            max_running_requests=max(64, most),
            chunked_prefill_size=max(512, most * cfg.prompt_len),
            context_length=cfg.prompt_len + cfg.new_tokens + 16,
            # Rounds repeat the same prompts: a prefix cache would skip their prefill and
            # the comparison with transformers (which keeps none) would be void.
            disable_radix_cache=True,
        )
    )
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_dir(model_name), dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # both sides generate exactly new_tokens
    hf.generation_config.pad_token_id = 0
    return engine, hf.eval()


def floor_ratio(engine, prompt: list[int], cfg: EngineBenchConfig) -> dict[str, float]:
    """Batch-1 decode step against the weight-read floor: weight bytes / copy bandwidth (the
    target's measure), and weight bytes / read-only bandwidth (stricter). Bandwidths and
    step are measured in alternating rounds, so load from other processes hits them alike;
    the median round (by the copy ratio) is reported."""
    weight_bytes = engine.model.weights.num_bytes()
    rounds = []
    for _ in range(cfg.floor_rounds):
        copy_gbs, read_gbs = copy_bandwidth_gbs(), read_bandwidth_gbs()
        step_ms = pdserve_run(engine, [prompt], cfg.new_tokens)["decode_step_ms"]
        floor_ms = 1000 * weight_bytes / (copy_gbs * 1e9)
        read_floor_ms = 1000 * weight_bytes / (read_gbs * 1e9)
        rounds.append(
            {
                "decode_step_ms": step_ms,
                "copy_bandwidth_gbs": copy_gbs,
                "floor_ms": floor_ms,
                "ratio": step_ms / floor_ms,
                "read_bandwidth_gbs": read_gbs,
                "read_floor_ms": read_floor_ms,
                "read_ratio": step_ms / read_floor_ms,
            }
        )
    return sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]


def bench_model(model_name: str, cfg: EngineBenchConfig) -> dict[str, Any]:
    engine, hf = _load(model_name, cfg)
    vocab = engine.model.args.vocab_size
    pdserve_run(engine, _prompts(2, 8, vocab), 3)  # warm-up (allocations, kernels)
    hf_generate_s(hf, _prompts(1, 8, vocab), 3)
    by_batch = {}
    for batch in cfg.batch_sizes:
        prompts = _prompts(batch, cfg.prompt_len, vocab)
        by_batch[batch] = {
            "pdserve": pdserve_run(engine, prompts, cfg.new_tokens),
            "transformers": hf_run(hf, prompts, cfg.new_tokens),
        }
    prompts = _prompts(cfg.sequential_requests, cfg.prompt_len, vocab, salt=1)
    concurrent_s = pdserve_run(engine, prompts, cfg.new_tokens)["total_s"]
    sequential_s = sum(hf_generate_s(hf, [p], cfg.new_tokens) for p in prompts)
    return {
        "model": model_name,
        "weight_mb": engine.model.weights.num_bytes() / 1e6,
        "by_batch": by_batch,
        "concurrent": {
            "requests": cfg.sequential_requests,
            "pdserve_concurrent_s": concurrent_s,
            "transformers_sequential_s": sequential_s,
            "speedup": sequential_s / concurrent_s,
        },
        "floor": floor_ratio(engine, prompts[0], cfg),
    }


def run(cfg: EngineBenchConfig) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg.torch_threads)
    return {
        "machine": platform.processor() or platform.machine(),
        "torch_threads": cfg.torch_threads,
        "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens,
        "floor_rounds": cfg.floor_rounds,
        "models": [bench_model(m, cfg) for m in cfg.models],
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"engine bench: prompt {report['prompt_len']} tokens, {report['new_tokens']} new, "
        f"{report['torch_threads']} thread(s)",
        "(pdserve / transformers on the same weights)",
        f"{'model':<24}{'batch':>6}{'prefill tok/s':>22}{'decode tok/s':>22}{'decode step ms':>20}",
    ]
    for m in report["models"]:
        for batch, r in m["by_batch"].items():
            p, h = r["pdserve"], r["transformers"]
            lines.append(
                f"{m['model']:<24}{batch:>6}"
                f"{p['prefill_tok_s']:>11.0f} /{h['prefill_tok_s']:>9.0f}"
                f"{p['decode_tok_s']:>11.1f} /{h['decode_tok_s']:>9.1f}"
                f"{p['decode_step_ms']:>10.1f} /{h['decode_step_ms']:>8.1f}"
            )
        c, f = m["concurrent"], m["floor"]
        lines.append(
            f"  {c['requests']} requests: pdserve concurrent {c['pdserve_concurrent_s']:.2f} s vs "
            f"transformers one after another {c['transformers_sequential_s']:.2f} s = "
            f"{c['speedup']:.1f}x (target >= 3x)"
        )
        lines.append(
            f"  batch-1 decode step {f['decode_step_ms']:.1f} ms vs weight-read floor "
            f"{f['floor_ms']:.1f} ms ({m['weight_mb']:.0f} MB at {f['copy_bandwidth_gbs']:.1f} "
            f"GB/s copy) = {f['ratio']:.2f}x ({_floor_target(m['weight_mb'])}); vs read-only floor "
            f"{f['read_floor_ms']:.1f} ms ({f['read_bandwidth_gbs']:.1f} GB/s) = "
            f"{f['read_ratio']:.2f}x; median of {report['floor_rounds']} rounds"
        )
    return "\n".join(lines)


# Weights this small stay in the caches, and a memory floor says nothing about them.
_CACHE_RESIDENT_MB = 64


def _floor_target(weight_mb: float) -> str:
    if weight_mb < _CACHE_RESIDENT_MB:
        return "weights fit in the caches: no memory floor"
    return "target <= 2x"


def main(args: argparse.Namespace) -> int:
    cfg = from_args(EngineBenchConfig, args)
    report = run(cfg)
    print(json.dumps(report, indent=2) if cfg.output == "json" else format_table(report))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-engine",
        help="engine throughput vs transformers on the same weights, and vs the memory floor",
        description=__doc__.splitlines()[0],
    )
    add_arguments(parser, EngineBenchConfig, "engine benchmark")
    parser.set_defaults(func=main)
