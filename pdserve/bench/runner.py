"""One benchmark run: find the tokenizer, build the workload, send it on schedule, collect
records and the server's counters. The asyncio shell of the `pdserve bench` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from pdserve.bench import client, textfit, trace, workload
from pdserve.bench.config import BenchConfig
from pdserve.bench.metrics import RequestRecord
from pdserve.bench.streams import PATHS, build_body
from pdserve.bench.workload import Prompt


@dataclass(frozen=True)
class Target:
    """Where and how to send: everything a request body needs besides its prompt."""

    base_url: str
    endpoint: str
    model: str | None
    temperature: float
    ignore_eos: bool
    extra_body: dict[str, Any] | None
    timeout_s: float

    @property
    def url(self) -> str:
        return self.base_url + PATHS[self.endpoint]

    def body(self, prompt: Prompt) -> dict[str, Any]:
        return build_body(
            self.endpoint, prompt, self.model, self.temperature, self.ignore_eos, self.extra_body
        )


def resolve_tokenizer_path(name: str | None, model_info: dict[str, Any] | None) -> str:
    """Where to load the tokenizer from: `name` (a dir, a pdserve model name, else passed on
    to transformers as a hub id), or else the server's `/model_info` `tokenizer_path` or
    `model_path` when one is a local dir or a pdserve model name."""
    candidates = [name] if name else []
    if not name and model_info:
        candidates += [model_info.get("tokenizer_path"), model_info.get("model_path")]
    for candidate in filter(None, candidates):
        if os.path.isdir(candidate):
            return candidate
        builtin = _builtin_model_dir(candidate)
        if builtin is not None:
            return builtin
    if name:
        return name
    raise ValueError(
        f"no local tokenizer found (tried {candidates or 'nothing'}); pass --tokenizer DIR"
    )


def _builtin_model_dir(name: str) -> str | None:
    try:
        from pdserve.engine.loader import BUILTIN_MODELS, resolve_model_dir
    except ImportError:
        return None
    return str(resolve_model_dir(name)) if name in BUILTIN_MODELS else None


def load_tokenizer(path: str) -> Any:
    """The tokenizer at `path`; ValueError naming it when it cannot be loaded (transformers'
    own messages speak of repo ids and internet connections, not of the flag)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"tokenizer {path!r} cannot be loaded ({exc}); see --tokenizer") from None


def _lengths(cfg: BenchConfig, rng: np.random.Generator, count: int) -> tuple[list[int], list[int]]:
    dist, ratio = cfg.length_dist, cfg.random_range_ratio
    inputs = workload.sample_lengths(rng, cfg.random_input_len, ratio, dist, count)
    outputs = workload.sample_lengths(rng, cfg.random_output_len, ratio, dist, count)
    return inputs, outputs


def build_workload(
    cfg: BenchConfig, tokenizer: Any
) -> tuple[list[Prompt], list[float] | None, list[Prompt]]:
    """(prompts, a trace's send times in seconds or None, warmup prompts)."""
    rng = np.random.default_rng(cfg.seed)
    allowed = textfit.allowed_token_ids(tokenizer, text_safe=cfg.endpoint != "generate")
    trace_times = None
    if cfg.dataset_name == "trace":
        with open(cfg.trace_file or "", encoding="utf-8") as f:
            rows = trace.parse_trace(f, limit=cfg.num_prompts)
        if not rows:
            raise ValueError(f"trace {cfg.trace_file} has no requests")
        scale = cfg.trace_length_scale
        rows = trace.scale_lengths(rows, scale)
        block_size = max(1, round(cfg.trace_block_size * scale))
        prompts = workload.trace_prompts(rows, allowed, block_size, cfg.seed)
        trace_times = trace.trace_send_times(rows, cfg.trace_speedup)
    else:
        inputs, outputs = _lengths(cfg, rng, cfg.num_prompts)
        if cfg.dataset_name == "shared-prefix":
            prompts = workload.shared_prefix_prompts(
                rng, allowed, cfg.shared_prefix_groups, cfg.shared_prefix_len, inputs, outputs
            )
        else:
            prompts = workload.random_prompts(rng, allowed, inputs, outputs)
    # warmup prompts: the same lengths as the first ones (again from the start when there
    # are more warmups than prompts), but fresh tokens (no cache hits)
    warm_rng = np.random.default_rng([cfg.seed, 3])
    head = [prompts[i % len(prompts)] for i in range(cfg.warmup_requests)]
    warmup = workload.random_prompts(
        warm_rng, allowed, [p.input_len for p in head], [p.output_len for p in head]
    )
    if cfg.endpoint != "generate":
        chat = cfg.endpoint == "chat"
        prompts = textfit.attach_texts(tokenizer, prompts, chat, cfg.seed)
        warmup = textfit.attach_texts(tokenizer, warmup, chat, cfg.seed + 1)
    return prompts, trace_times, warmup


def send_times(cfg: BenchConfig, count: int, rate: float) -> list[float]:
    """Arrival times of a generated workload at `rate` (the seed makes reruns identical)."""
    rng = np.random.default_rng([cfg.seed, 4])
    return trace.arrival_times(rng, count, rate, cfg.burstiness)


async def send_all(
    session: aiohttp.ClientSession,
    target: Target,
    prompts: Sequence[Prompt],
    send_times: Sequence[float],
    max_concurrency: int | None,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send every prompt at its time (waiting for a free slot under `max_concurrency`);
    returns the records and the run's duration in seconds, first send to last answer."""
    bodies = [target.body(p) for p in prompts]
    records = [
        RequestRecord(i, p.input_len, p.output_len, send_times[i]) for i, p in enumerate(prompts)
    ]
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    start = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + send_times[i] - time.perf_counter()))
        async with slots:
            await client.send_request(
                session, target.url, target.endpoint, bodies[i], records[i], start, target.timeout_s
            )
        if on_record is not None:
            on_record(records[i])

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return records, time.perf_counter() - start
