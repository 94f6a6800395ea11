"""GPU decode benchmark, one process on one CUDA device: random-weight Llama-3-8B and
Llama-3.2-1B shapes in bf16, pdserve's engine against transformers `generate` on the same
weights, and the weight-read floor from the copy bandwidth measured in the same run.

Run: `python -m pdserve.bench.gpu_bench [--shapes llama3.2-1b llama3-8b] [--out-dir DIR]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pdserve.config import add_arguments, check, from_args, opt
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.loader import LoadedModel
from pdserve.engine.model import ModelArgs, weights_from_state_dict
from pdserve.engine.request import Request, SamplingParams

_COMMON = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
)
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(
        _COMMON,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama3-8b": dict(
        _COMMON,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class GpuBenchConfig:
    shapes: list[str] = opt(list(SHAPES), f"model shapes to measure: {sorted(SHAPES)}")
    prompt_len: int = opt(512, "prompt tokens per request")
    batch_size: int = opt(64, "concurrent requests of the throughput measurement")
    new_tokens: int = opt(128, "tokens generated per request in the throughput measurement")
    batch1_steps: int = opt(64, "decode steps timed at batch 1")
    chunked_prefill_size: int = opt(4096, "pdserve prompt tokens per prefill step")
    out_dir: str | None = opt(None, "write results.json here")
    profile: bool = opt(False, "print the GPU kernels of one batch-1 decode step per shape")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shapes) - set(SHAPES))
        check(not unknown, f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
        check(self.prompt_len > 0 and self.batch_size > 0, "sizes must be > 0")
        check(self.new_tokens > 4 and self.batch1_steps > 4, "--new-tokens, --batch1-steps > 4")


def copy_bandwidth_bps(num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median)."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * num_bytes / (median_event_ms(lambda: dst.copy_(src), repeats) / 1e3)


def median_event_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build_hf_model(shape: dict[str, Any]):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = None  # always generate the full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def engine_on(hf_model, cfg: GpuBenchConfig) -> Engine:
    """A pdserve engine on the transformers model's own weight tensors (q/k/v and gate/up
    are concatenated copies)."""
    args = ModelArgs.from_hf_config(hf_model.config.to_dict())
    weights = weights_from_state_dict(
        hf_model.state_dict(), args, torch.bfloat16, torch.device("cuda")
    )
    model = LoadedModel("", args, weights, frozenset(), "gpu-bench")
    max_len = cfg.prompt_len + max(cfg.new_tokens, cfg.batch1_steps) + 16
    engine_cfg = EngineConfig(
        model_path="random",
        device="cuda",
        dtype="bfloat16",
        max_running_requests=cfg.batch_size,
        chunked_prefill_size=cfg.chunked_prefill_size,
        context_length=max_len,
        max_total_tokens=cfg.batch_size * max_len,
    )
    return Engine(engine_cfg, model)


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Serve the prompts together; wall time and the host-clock time of each full decode
    step (every request in the batch decoding)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(Request(f"bench-{i}", ids, params))
    full_steps_s = []
    while engine.has_work():
        t0 = time.perf_counter()
        outs = engine.step()
        if len(outs) == len(prompts) and all(o.finish_reason is None for o in outs):
            full_steps_s.append(time.perf_counter() - t0)
    wall_s = time.perf_counter() - started
    step_ms = 1e3 * statistics.median(full_steps_s[2:]) if len(full_steps_s) > 2 else None
    return {"wall_s": wall_s, "step_ms": step_ms}


def hf_generate_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    torch.cuda.synchronize()
    return time.perf_counter() - started


def measure_transformers(model, cfg: GpuBenchConfig, one: list[list[int]], many) -> dict:
    hf_generate_s(model, one, 2)  # warm-up
    short, long = 2, 2 + cfg.batch1_steps // 2
    b1_step_ms = 1e3 * (hf_generate_s(model, one, long) - hf_generate_s(model, one, short))
    b1_step_ms /= long - short
    short_s = hf_generate_s(model, many, 2)
    wall_s = hf_generate_s(model, many, cfg.new_tokens)
    return {
        "bN_prefill_s": short_s,
        "b1_step_ms": b1_step_ms,
        "bN_wall_s": wall_s,
        "bN_tok_s": len(many) * cfg.new_tokens / wall_s,
        "bN_step_ms": 1e3 * (wall_s - short_s) / (cfg.new_tokens - 2),
    }


def measure_pdserve(engine: Engine, cfg: GpuBenchConfig, one, many) -> dict:
    run_engine(engine, many, 4)  # warm-up: prefill and decode shapes
    b1 = run_engine(engine, one, cfg.batch1_steps)
    decoder = engine.runner.decoder
    graph, _ = decoder._graphs[1]
    replay_ms = median_event_ms(graph.replay, 50)
    eager_ms = median_event_ms(lambda: decoder._forward(decoder.meta[:1]), 20)
    if cfg.profile:  # rows past the first still hold the warm-up batch's last step
        for rows in (1, len(many)):
            profile_step(lambda rows=rows: decoder._forward(decoder.meta[:rows]))
    bn = run_engine(engine, many, cfg.new_tokens)
    # meta now holds the last full step (the longest contexts): GPU time of that graph
    bucket = decoder.bucket_for(len(many))
    bn_replay_ms = median_event_ms(decoder._graphs[bucket][0].replay, 20) if bucket else None
    prefill_s = run_engine(engine, many, 1)["wall_s"]
    return {
        "b1_step_ms": b1["step_ms"],
        "b1_graph_replay_ms": replay_ms,
        "b1_no_graph_ms": eager_ms,
        "bN_wall_s": bn["wall_s"],
        "bN_tok_s": len(many) * cfg.new_tokens / bn["wall_s"],
        "bN_step_ms": bn["step_ms"],
        "bN_graph_replay_ms": bn_replay_ms,
        "bN_prefill_s": prefill_s,
    }


def profile_step(step) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


def bench_shape(name: str, cfg: GpuBenchConfig, copy_bps: float) -> dict[str, Any]:
    model = build_hf_model(SHAPES[name])
    gen = torch.Generator().manual_seed(1)
    many = torch.randint(1000, 100000, (cfg.batch_size, cfg.prompt_len), generator=gen).tolist()
    one = many[:1]
    hf = measure_transformers(model, cfg, one, many)
    print(name, "transformers", json.dumps(hf), flush=True)
    engine = engine_on(model, cfg)
    weight_bytes = engine.model.weights.num_bytes()
    ours = measure_pdserve(engine, cfg, one, many)
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    floor_ms = 1e3 * weight_bytes / copy_bps
    return {
        "shape": name,
        "weight_gb": weight_bytes / 1e9,
        "floor_ms": floor_ms,
        "pdserve": ours,
        "transformers": hf,
        "b1_step_over_floor": ours["b1_step_ms"] / floor_ms,
        "b1_replay_over_floor": ours["b1_graph_replay_ms"] / floor_ms,
        "bN_tok_s_ratio": ours["bN_tok_s"] / hf["bN_tok_s"],
    }


def print_table(results: list[dict[str, Any]], copy_bps: float, cfg: GpuBenchConfig) -> None:
    n = cfg.batch_size
    print(f"\ndevice: {torch.cuda.get_device_name()}; copy bandwidth {copy_bps / 1e12:.2f} TB/s")
    print(f"prompts {cfg.prompt_len} tokens; batch {n} generates {cfg.new_tokens} tokens each")
    head = (
        f"{'shape':<12} {'GB':>5} {'floor':>6} {'b1 step':>8} {'x floor':>7} {'replay':>7} "
        f"{'no graph':>8} {'HF b1':>7} {f'b{n} step':>8} {f'HF b{n}':>8} {f'b{n} tok/s':>10} "
        f"{'HF tok/s':>9} {'x HF':>5}"
    )
    print(head + "\n" + "-" * len(head))
    for r in results:
        ours, hf = r["pdserve"], r["transformers"]
        print(
            f"{r['shape']:<12} {r['weight_gb']:5.2f} {r['floor_ms']:6.2f} "
            f"{ours['b1_step_ms']:8.2f} {r['b1_step_over_floor']:7.2f} "
            f"{ours['b1_graph_replay_ms']:7.2f} {ours['b1_no_graph_ms']:8.2f} "
            f"{hf['b1_step_ms']:7.2f} {ours['bN_step_ms']:8.2f} {hf['bN_step_ms']:8.2f} "
            f"{ours['bN_tok_s']:10.0f} {hf['bN_tok_s']:9.0f} {r['bN_tok_s_ratio']:5.1f}"
        )
    print("times in ms; b1 step = engine.step() wall time at batch 1 (host overhead included)")
    for r in results:
        ours, hf = r["pdserve"], r["transformers"]
        print(
            f"{r['shape']}: b{n} decode step {ours['bN_step_ms']:.2f} ms of which graph GPU time "
            f"{ours['bN_graph_replay_ms']:.2f} ms; prefill of {n} prompts {ours['bN_prefill_s']:.2f} s "
            f"(transformers {hf['bN_prefill_s']:.2f} s); decode-only step ratio "
            f"{hf['bN_step_ms'] / ours['bN_step_ms']:.1f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, GpuBenchConfig, "gpu bench")
    cfg = from_args(GpuBenchConfig, parser.parse_args(argv))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bps = copy_bandwidth_bps()
    results = []
    for name in cfg.shapes:
        results.append(bench_shape(name, cfg, copy_bps))
        print(json.dumps(results[-1]), flush=True)
    print_table(results, copy_bps, cfg)
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        report = {"config": asdict(cfg), "copy_bytes_per_s": copy_bps, "results": results}
        report["device"] = torch.cuda.get_device_name()
        with open(os.path.join(cfg.out_dir, "gpu_bench.json"), "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
