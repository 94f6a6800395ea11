"""The tables `gpu_bench` prints: decode against the weight-read floor and transformers,
overlap scheduling against its baseline of the same run, prefill against the matmul rate."""

from __future__ import annotations

from typing import Any, Protocol


class RunSizes(Protocol):
    """What the tables need of the run's configuration (gpu_bench's GpuBenchConfig, which
    imports this module)."""

    prompt_len: int
    batch_size: int
    new_tokens: int


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _f(value: float | None, spec: str) -> str:
    """value formatted, or a dash right-aligned to the same width where not measured."""
    width = spec.split(".")[0]
    return format(value, spec) if value is not None else format("-", f">{width}")


def print_table(
    results: list[dict[str, Any]],
    copy_bps: float,
    matmul_fps: float | None,
    cfg: RunSizes,
    device: str,
) -> None:
    n = cfg.batch_size
    matmul = f"; bf16 matmul {matmul_fps / 1e12:.0f} TFLOP/s" if matmul_fps else ""
    print(f"\ndevice: {device}; copy bandwidth {copy_bps / 1e9:.0f} GB/s{matmul}")
    print(f"prompts {cfg.prompt_len} tokens; batch {n} generates {cfg.new_tokens} tokens each")
    head = (
        f"{'shape':<18} {'GB':>5} {'floor':>6} {'b1 step':>8} {'x floor':>7} {'replay':>7} "
        f"{'no graph':>8} {'HF b1':>7} {f'b{n} step':>8} {f'HF b{n}':>8} {f'b{n} tok/s':>10} "
        f"{'HF tok/s':>9} {'x HF':>5}"
    )
    print(head + "\n" + "-" * len(head))
    for r in results:
        ours, hf = r["pdserve"], r["transformers"]
        print(
            f"{r['shape']:<18} {r['weight_gb']:5.2f} {r['floor_ms']:6.2f} "
            f"{_f(ours['b1_step_ms'], '8.2f')} {r['b1_step_over_floor']:7.2f} "
            f"{_f(ours['b1_graph_replay_ms'], '7.2f')} {_f(ours['b1_no_graph_ms'], '8.2f')} "
            f"{hf['b1_step_ms']:7.2f} {_f(ours['bN_step_ms'], '8.2f')} {hf['bN_step_ms']:8.2f} "
            f"{ours['bN_tok_s']:10.0f} {hf['bN_tok_s']:9.0f} {r['bN_tok_s_ratio']:5.1f}"
        )
    print(
        "times in ms; b1 step = engine.step() wall time at batch 1 (host overhead included); "
        "GB and floor: the weights one batch-1 step reads (MoE: the routed experts only)"
    )
    for r in results:
        ours, hf = r["pdserve"], r["transformers"]
        print(
            f"{r['shape']}: b{n} decode step {_f(ours['bN_step_ms'], '.2f')} ms of which graph "
            f"GPU time {_f(ours['bN_graph_replay_ms'], '.2f')} ms; prefill of {n} prompts "
            f"{ours['bN_prefill_s']:.2f} s (transformers {hf['bN_prefill_s']:.2f} s)"
        )
        if ours["no_overlap"] is not None:
            print_overlap(r, n)
        if ours["prefill"] is not None:
            print_prefill(r["shape"], ours["prefill"], cfg)


def print_overlap(r: dict[str, Any], n: int) -> None:
    """Decode steps with overlap scheduling against the run's baseline without it."""
    ours, off = r["pdserve"], r["pdserve"]["no_overlap"]
    replay_ms, floor_ms = ours["bN_graph_replay_ms"], r["floor_ms"]
    for label, fig in (("overlap off", off), ("overlap on", ours)):
        print(
            f"{r['shape']}: {label:<11} b1 step {_f(fig['b1_step_ms'], '.2f')} ms = "
            f"{_f(ratio(fig['b1_step_ms'], floor_ms), '.2f')}x floor; b{n} step "
            f"{_f(fig['bN_step_ms'], '.2f')} ms = {_f(ratio(fig['bN_step_ms'], replay_ms), '.2f')}x "
            f"graph GPU time; b{n} {fig['bN_tok_s']:.0f} tok/s"
        )
    print(
        f"{r['shape']}: overlap on / off: b1 step {_f(ratio(ours['b1_step_ms'], off['b1_step_ms']), '.2f')}x, "
        f"b{n} step {_f(ratio(ours['bN_step_ms'], off['bN_step_ms']), '.2f')}x"
    )


def print_prefill(shape: str, pre: dict[str, Any], cfg: RunSizes) -> None:
    print(
        f"{shape}: prefill {cfg.batch_size} x {cfg.prompt_len} tokens "
        f"({pre['prefill_tflop']:.1f} TFLOP): fused {pre['fused_s'] * 1e3:.1f} ms = "
        f"{pre['fused_tflop_s']:.0f} TFLOP/s = {pre['fused_over_matmul']:.2f}x matmul; "
        f"PyTorch path {pre['pytorch_path_s'] * 1e3:.1f} ms "
        f"({pre['speedup_over_pytorch_path']:.2f}x the fused time)"
    )
