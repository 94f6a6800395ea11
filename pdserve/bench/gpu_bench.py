"""GPU decode benchmark, one process on one CUDA device: random-weight Llama-3-8B,
Llama-3.2-1B and Qwen3-30B-A3B (MoE, 24 of its 48 layers) shapes in bf16, pdserve's engine
against transformers `generate` on the same weights, and the floor of the weight bytes a
step reads (a MoE step: only its routed experts) at the copy bandwidth measured in the run.

Run: `python -m pdserve.bench.gpu_bench [--shapes llama3.2-1b ...] [--out-dir DIR]`; a CPU
smoke run: `--device cpu --dtype float32 --shapes tiny-moe --prompt-len 16 --batch-size 4`.
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

from pdserve.bench.gpu_bench_report import print_table, ratio
from pdserve.bench.gpu_bench_shapes import ALL_SHAPES, MOE_SHAPES, SHAPES, build_hf_model
from pdserve.bench.gpu_prefill import measure_prefill
from pdserve.config import add_arguments, check, from_args, opt
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.loader import LoadedModel
from pdserve.engine.model import ModelArgs, weights_from_state_dict
from pdserve.engine.request import Request, SamplingParams


@dataclass(frozen=True)
class GpuBenchConfig:
    shapes: list[str] = opt(
        [*SHAPES, *MOE_SHAPES], f"model shapes to measure: {sorted(ALL_SHAPES)}"
    )
    device: str = opt("cuda", "cuda, or cpu for a smoke run of the tiny shapes")
    dtype: str = opt("bfloat16", "weights and activations dtype", choices=["bfloat16", "float32"])
    prompt_len: int = opt(512, "prompt tokens per request")
    batch_size: int = opt(64, "concurrent requests of the throughput measurement")
    new_tokens: int = opt(128, "tokens generated per request in the throughput measurement")
    batch1_steps: int = opt(64, "decode steps timed at batch 1")
    chunked_prefill_size: int = opt(4096, "pdserve prompt tokens per prefill step")
    out_dir: str | None = opt(None, "write results.json here")
    profile: bool = opt(False, "print the GPU kernels of one batch-1 decode step per shape")
    overlap: bool = opt(
        True,
        "measure decode with overlap scheduling, and without it as the baseline of the same "
        "run (--no-overlap: without only)",
    )

    decode_gemv: str = opt(
        "off",
        "the engine's --decode-gemv: dense linear layers of decode steps of <= 4 rows through "
        "the Triton GEMV (run the bench once with each to compare)",
        choices=["off", "on"],
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shapes) - set(ALL_SHAPES))
        check(not unknown, f"unknown shapes {unknown}; choose from {sorted(ALL_SHAPES)}")
        check(self.device in ("cuda", "cpu"), f"--device must be cuda or cpu, got {self.device}")
        check(self.prompt_len > 0 and self.batch_size > 0, "sizes must be > 0")
        check(self.new_tokens > 4 and self.batch1_steps > 4, "--new-tokens, --batch1-steps > 4")


def copy_bandwidth_bps(device: str = "cuda", num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Copy bandwidth on the device, bytes read + written per second (median)."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / (median_ms(lambda: dst.copy_(src), repeats, device) / 1e3)


def median_ms(fn, repeats: int, device: str, warmup: int = 3) -> float:
    """Median time of fn: CUDA events on a GPU, the host clock on the CPU."""
    if device == "cuda":
        return median_event_ms(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(size: int = 8192, repeats: int = 20) -> float:
    """bf16 GEMM rate of a large square matmul (median of CUDA-event timings)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size**3 / (median_event_ms(lambda: a @ b, repeats) / 1e3)


LAUNCH_COVER_CYCLES = 2_000_000  # about 1 ms of GPU clock cycles: longer than any launch


def median_event_ms(fn, repeats: int, warmup: int = 3, hide_launch: bool = False) -> float:
    """Median ms between CUDA events around `fn`. `hide_launch`: a sleep kernel queued before
    the first event keeps the GPU busy while the host launches `fn`'s kernels, so the
    events time the kernels alone (a launch's host time, e.g. Triton's JIT, otherwise counts
    where the kernels are short)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hide_launch:
            torch.cuda.synchronize()
            torch.cuda._sleep(LAUNCH_COVER_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def engine_on(hf_model, cfg: GpuBenchConfig) -> Engine:
    """A pdserve engine on the transformers model's own weight tensors (q/k/v and gate/up
    are concatenated copies)."""
    args = ModelArgs.from_hf_config(hf_model.config.to_dict())
    dtype = getattr(torch, cfg.dtype)
    weights = weights_from_state_dict(hf_model.state_dict(), args, dtype, torch.device(cfg.device))
    model = LoadedModel("", args, weights, frozenset(), "gpu-bench")
    max_len = cfg.prompt_len + max(cfg.new_tokens, cfg.batch1_steps) + 16
    engine_cfg = EngineConfig(
        model_path="random",
        device=cfg.device,
        dtype=cfg.dtype,
        max_running_requests=cfg.batch_size,
        chunked_prefill_size=cfg.chunked_prefill_size,
        context_length=max_len,
        max_total_tokens=cfg.batch_size * max_len,
        # Warm-up and repeats reuse the prompts: with a prefix cache every later prefill
        # would compute one token, and prefill and batch figures would be void.
        disable_radix_cache=True,
        decode_gemv=cfg.decode_gemv,
    )
    return Engine(engine_cfg, model)


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Serve the prompts together; wall time and the host-clock time of each full decode
    step (every request in the batch decoding)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sync(engine.kv_pool.device.type)
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
    on_gpu = engine.kv_pool.device.type == "cuda"
    replay_ms = bN_graph_replay_ms(engine, len(prompts)) if on_gpu else None
    return {"wall_s": wall_s, "step_ms": step_ms, "graph_replay_ms": replay_ms}


def hf_generate_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    sync(model.device.type)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    sync(model.device.type)
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


def measure_without_overlap(engine: Engine, cfg: GpuBenchConfig, one, many) -> dict:
    """The baseline of the same run: each decode step's tokens read before the next one
    is scheduled (the host's work and the GPU's alternate)."""
    engine.overlap = False  # nothing is in flight between runs
    try:
        b1 = run_engine(engine, one, cfg.batch1_steps)
        bn = run_engine(engine, many, cfg.new_tokens)
    finally:
        engine.overlap = True
    return {
        "b1_step_ms": b1["step_ms"],
        "bN_step_ms": bn["step_ms"],
        "bN_tok_s": len(many) * cfg.new_tokens / bn["wall_s"],
    }


def measure_pdserve(
    engine: Engine, cfg: GpuBenchConfig, one, many, matmul_fps: float | None
) -> dict:
    run_engine(engine, many, 4)  # warm-up: prefill and decode shapes
    engine.overlap = cfg.overlap
    no_overlap = measure_without_overlap(engine, cfg, one, many) if cfg.overlap else None
    b1 = run_engine(engine, one, cfg.batch1_steps)
    on_gpu = cfg.device == "cuda"
    b1_graph = b1_graph_times(engine, cfg, len(many)) if on_gpu else {}
    bn = run_engine(engine, many, cfg.new_tokens)
    prefill_s = run_engine(engine, many, 1)["wall_s"]
    return {
        "overlap": cfg.overlap,
        "no_overlap": no_overlap,
        "b1_step_ms": b1["step_ms"],
        "b1_graph_replay_ms": b1_graph.get("replay_ms"),
        "b1_no_graph_ms": b1_graph.get("no_graph_ms"),
        "bN_wall_s": bn["wall_s"],
        "bN_tok_s": len(many) * cfg.new_tokens / bn["wall_s"],
        "bN_step_ms": bn["step_ms"],
        "bN_graph_replay_ms": bn["graph_replay_ms"] if on_gpu else None,
        "bN_prefill_s": prefill_s,
        # dense shapes on the GPU only: the FLOP count assumes every MLP weight is used
        "prefill": measure_prefill(engine, many, matmul_fps)
        if matmul_fps and engine.model.args.moe is None
        else None,
    }


def b1_graph_times(engine: Engine, cfg: GpuBenchConfig, batch_size: int) -> dict[str, float]:
    """GPU time of the batch-1 decode graph, and of the same step launched from Python."""
    decoder = engine.runner.decoder
    graph, _ = decoder._graphs[1]
    times = {
        "replay_ms": median_event_ms(graph.replay, 50),
        "no_graph_ms": median_event_ms(lambda: decoder._forward(decoder.meta[:1]), 20),
    }
    if cfg.profile:  # rows past the first still hold the warm-up batch's last step
        for rows in (1, batch_size):
            profile_step(lambda rows=rows: decoder._forward(decoder.meta[:rows]))
    return times


def bN_graph_replay_ms(engine: Engine, batch_size: int) -> float | None:
    """GPU time of the graph of the last full decode step (meta still holds it)."""
    decoder = engine.runner.decoder
    bucket = decoder.bucket_for(batch_size)
    return median_event_ms(decoder._graphs[bucket][0].replay, 20) if bucket else None


def profile_step(step) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


def bench_shape(
    name: str, cfg: GpuBenchConfig, copy_bps: float, matmul_fps: float | None
) -> dict[str, Any]:
    shape = ALL_SHAPES[name]
    model = build_hf_model(shape, torch.device(cfg.device), getattr(torch, cfg.dtype))
    gen = torch.Generator().manual_seed(1)
    high = min(shape["vocab_size"], 100000)
    many = torch.randint(3, high, (cfg.batch_size, cfg.prompt_len), generator=gen).tolist()
    one = many[:1]
    hf = measure_transformers(model, cfg, one, many)
    hf["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    print(name, "transformers", json.dumps(hf), flush=True)
    engine = engine_on(model, cfg)
    moe = engine.model.args.moe
    # Batch 1 reads the top-k experts of each sparse layer, no others.
    weight_bytes = engine.model.weights.num_bytes(moe.top_k if moe else None)
    ours = measure_pdserve(engine, cfg, one, many, matmul_fps)
    del engine, model
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    floor_ms = 1e3 * weight_bytes / copy_bps
    replay_ms = ours["b1_graph_replay_ms"]
    return {
        "shape": name,
        "weight_gb": weight_bytes / 1e9,
        "experts_read_per_layer": moe.top_k if moe else None,
        "floor_ms": floor_ms,
        "pdserve": ours,
        "transformers": hf,
        "b1_step_over_floor": ours["b1_step_ms"] / floor_ms,
        "b1_replay_over_floor": replay_ms / floor_ms if replay_ms is not None else None,
        "bN_step_over_replay": ratio(ours["bN_step_ms"], ours["bN_graph_replay_ms"]),
        "bN_tok_s_ratio": ours["bN_tok_s"] / hf["bN_tok_s"],
    }


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, GpuBenchConfig, "gpu bench")
    cfg = from_args(GpuBenchConfig, parser.parse_args(argv))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA device (--device cpu runs the tiny shapes on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bps = copy_bandwidth_bps(cfg.device, num_bytes=1 << (30 if cfg.device == "cuda" else 26))
    matmul_fps = matmul_flops_per_s() if cfg.device == "cuda" else None
    results = []
    for name in cfg.shapes:
        results.append(bench_shape(name, cfg, copy_bps, matmul_fps))
        print(json.dumps(results[-1]), flush=True)
    print_table(results, copy_bps, matmul_fps, cfg, device_name(cfg.device))
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        report = {"config": asdict(cfg), "copy_bytes_per_s": copy_bps, "results": results}
        report["device"] = device_name(cfg.device)
        report["matmul_flop_per_s"] = matmul_fps
        with open(os.path.join(cfg.out_dir, "gpu_bench.json"), "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
