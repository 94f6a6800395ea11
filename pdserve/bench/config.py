"""Options of `pdserve bench` (the serving benchmark client), one frozen dataclass.

The command line is generated from these fields by `pdserve.config.add_arguments`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pdserve import envs
from pdserve.config import check, opt

ENDPOINTS = ["generate", "completions", "chat"]
DATASETS = ["random", "shared-prefix", "trace", "multiturn"]
LENGTH_DISTS = ["uniform", "normal", "lognormal"]
THINK_TIME_DISTS = ["constant", "exponential"]


@dataclass(frozen=True)
class BenchConfig:
    # target
    base_url: str = opt("http://127.0.0.1:30000", "server or router to measure")
    endpoint: str = opt(
        "generate",
        "generate: native /generate with input_ids; completions: /v1/completions; "
        "chat: /v1/chat/completions",
        choices=ENDPOINTS,
    )
    model: str | None = opt(None, "model name for OpenAI routes (default: first of /v1/models)")
    tokenizer: str | None = opt(
        None,
        "tokenizer dir or pdserve model name (default: /model_info tokenizer_path or model_path)",
    )
    launch: str | None = opt(
        None,
        "command that starts the setup to measure (e.g. 'pdserve up ...'); waited for on "
        "/health, /readiness and /model_info, stopped after the run",
    )
    launch_timeout_s: float = opt(900.0, "deadline for the launched command to be ready")
    # workload
    dataset_name: str = opt("random", "workload kind", choices=DATASETS)
    num_prompts: int = opt(100, "requests to send (a trace is cut to its first N rows)")
    random_input_len: int = opt(512, "mean prompt length in tokens (suffix after a shared prefix)")
    random_output_len: int = opt(128, "mean output length in tokens")
    random_range_ratio: float = opt(
        0.0,
        "spread of lengths: uniform half-width, or coefficient of variation (normal, lognormal)",
    )
    length_dist: str = opt("uniform", "distribution of lengths", choices=LENGTH_DISTS)
    shared_prefix_groups: int = opt(4, "shared-prefix: number of groups (one prefix each)")
    shared_prefix_len: int = opt(256, "shared-prefix: prefix length in tokens")
    trace_file: str | None = opt(None, "trace: Mooncake FAST'25 JSONL file")
    trace_speedup: float = opt(1.0, "trace: replay this many times faster than recorded")
    trace_block_size: int = opt(512, "trace: tokens per hash id")
    trace_length_scale: float = opt(
        1.0, "trace: multiply lengths and the block size by this (fit a trace to a small model)"
    )
    num_conversations: int = opt(8, "multiturn: conversations, all running at once")
    num_turns: int = opt(4, "multiturn: turns per conversation")
    system_prompt_len: int = opt(512, "multiturn: tokens of the system prompt all of them share")
    user_len: int = opt(64, "multiturn: tokens of each user message")
    think_time_s: float = opt(0.0, "multiturn: pause between an answer and the next turn")
    think_time_dist: str = opt(
        "constant",
        "multiturn: think time of every pause, or exponentially distributed with that mean "
        "(users drift apart as real ones do)",
        choices=THINK_TIME_DISTS,
    )
    conversation_stagger_s: float = opt(
        0.0, "multiturn: conversation i starts i times this many seconds after the first"
    )
    metrics_urls: list[str] = opt(
        [],
        "servers whose /metrics are read before and after the run for KV bytes transferred, "
        "cached tokens and PD stage timings (e.g. the prefill and decode servers behind a router)",
    )
    seed: int = opt(0, "random seed for lengths, tokens and arrivals")
    # load
    request_rate: float = opt(
        math.inf, "Poisson arrivals per second (inf: all at once)", allow_inf=True
    )
    burstiness: float = opt(1.0, "gamma shape of inter-arrival times (1.0: Poisson)")
    max_concurrency: int | None = opt(None, "cap on requests in flight (default: no cap)")
    warmup_requests: int = opt(0, "requests sent (and waited for) before measuring; not counted")
    temperature: float = opt(0.0, "sampling temperature")
    ignore_eos: bool = opt(True, "ask the server to ignore EOS so outputs reach their length")
    extra_body: str | None = opt(None, "JSON object merged into every request body")
    api_key: str | None = opt(
        envs.api_key(),
        "sent as 'Authorization: Bearer <key>' on every request (default: env PDSERVE_API_KEY)",
        repr=False,
    )
    request_timeout_s: float = opt(600.0, "deadline for one request, headers to last byte")
    # report
    slo_ttft_ms: float | None = opt(None, "goodput: TTFT limit in ms (default: no limit)")
    slo_tpot_ms: float | None = opt(None, "goodput: TPOT limit in ms (default: no limit)")
    output: str | None = opt(None, "write every figure and per-request records to this JSON")
    plot_dir: str | None = opt(None, "write PNG plots (latency CDFs, TTFT and ITL over time) here")
    label: str | None = opt(None, "name of this run in reports and comparisons")
    progress: bool = opt(True, "show a progress bar")
    # sweep
    sweep_rates: list[float] = opt([], "run once per rate (ascending); report the highest good one")
    sweep_target: float = opt(0.9, "sweep: goodput share a rate must keep")
    sweep_search_steps: int = opt(
        0, "sweep: bisection runs between the best and the first bad rate"
    )

    def __post_init__(self) -> None:
        base = urlsplit(self.base_url)
        check(  # "notaurl/model_info did not answer: is the server up?" said otherwise
            base.scheme in ("http", "https") and bool(base.hostname),
            f"--base-url must look like http://host:port, got {self.base_url!r}",
        )
        check(self.num_prompts > 0, f"--num-prompts must be > 0, got {self.num_prompts}")
        check(self.random_input_len > 0, "--random-input-len must be > 0")
        check(self.random_output_len > 0, "--random-output-len must be > 0")
        check(self.random_range_ratio >= 0, "--random-range-ratio must be >= 0")
        check(
            self.length_dist != "uniform" or self.random_range_ratio < 1,
            "--random-range-ratio must be < 1 for a uniform distribution",
        )
        check(self.shared_prefix_groups > 0, "--shared-prefix-groups must be > 0")
        check(self.shared_prefix_len >= 0, "--shared-prefix-len must be >= 0")
        check(
            self.dataset_name != "trace" or self.trace_file is not None,
            "--dataset-name trace needs --trace-file",
        )
        check(self.trace_speedup > 0, "--trace-speedup must be > 0")
        check(self.trace_block_size > 0, "--trace-block-size must be > 0")
        check(self.trace_length_scale > 0, "--trace-length-scale must be > 0")
        check(self.num_conversations > 0, "--num-conversations must be > 0")
        check(self.num_turns > 0, "--num-turns must be > 0")
        check(self.system_prompt_len >= 0, "--system-prompt-len must be >= 0")
        check(self.user_len > 0, "--user-len must be > 0")
        check(self.think_time_s >= 0, "--think-time-s must be >= 0")
        check(self.conversation_stagger_s >= 0, "--conversation-stagger-s must be >= 0")
        check(
            self.dataset_name != "multiturn" or self.endpoint == "generate",
            "--dataset-name multiturn sends token ids: it needs --endpoint generate",
        )
        check(
            self.dataset_name != "multiturn" or not self.sweep_rates,
            "--sweep-rates does not apply to multiturn (conversations pace themselves)",
        )
        self._check_finite()
        check(self.temperature >= 0, "--temperature must be >= 0")
        check(self.slo_ttft_ms is None or self.slo_ttft_ms > 0, "--slo-ttft-ms must be > 0")
        check(self.slo_tpot_ms is None or self.slo_tpot_ms > 0, "--slo-tpot-ms must be > 0")
        check(self.request_rate > 0, "--request-rate must be > 0 (inf: all at once)")
        check(self.burstiness > 0, "--burstiness must be > 0")
        check(
            self.max_concurrency is None or self.max_concurrency > 0,
            "--max-concurrency must be > 0",
        )
        check(self.warmup_requests >= 0, "--warmup-requests must be >= 0")
        check(self.request_timeout_s > 0, "--request-timeout-s must be > 0")
        check(self.launch_timeout_s > 0, "--launch-timeout-s must be > 0")
        check(all(r > 0 for r in self.sweep_rates), "--sweep-rates must all be > 0")
        check(0 < self.sweep_target <= 1, "--sweep-target must be in (0, 1]")
        check(self.sweep_search_steps >= 0, "--sweep-search-steps must be >= 0")
        check(
            not self.sweep_rates or self.dataset_name != "trace",
            "--sweep-rates does not apply to a trace (use --trace-speedup)",
        )
        parse_extra_body(self.extra_body)  # refused here, before --launch starts anything

    def _check_finite(self) -> None:
        """nan or inf here would be sent, slept on, or written into the result as JSON's
        invalid NaN/Infinity (only --request-rate takes inf, meaning all at once)."""
        values = {
            "--temperature": self.temperature,
            "--burstiness": self.burstiness,
            "--slo-ttft-ms": self.slo_ttft_ms,
            "--slo-tpot-ms": self.slo_tpot_ms,
            "--think-time-s": self.think_time_s,
            "--conversation-stagger-s": self.conversation_stagger_s,
            "--trace-speedup": self.trace_speedup,
            "--trace-length-scale": self.trace_length_scale,
            "--random-range-ratio": self.random_range_ratio,
        }
        for flag, value in values.items():
            check(value is None or math.isfinite(value), f"{flag} must be finite, got {value}")


def parse_extra_body(raw: str | None) -> dict[str, Any] | None:
    """The --extra-body object (ValueError naming the flag if it is not one, or turns off
    the streaming every latency figure is read from)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"--extra-body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("--extra-body must be a JSON object")
    if value.get("stream", True) is not True:
        raise ValueError("--extra-body cannot turn off 'stream': the bench measures streams")
    return value
