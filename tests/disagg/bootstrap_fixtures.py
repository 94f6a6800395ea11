"""Worker registrations for the bootstrap tests (registry, server and client)."""

from __future__ import annotations

from pdserve.disagg.bootstrap_registry import WorkerRegistration


def registration(dp_rank: int, dp_size: int = 2, **overrides) -> WorkerRegistration:
    """A valid registration of prefill worker `dp_rank`; `overrides` replace fields."""
    fields = dict(
        dp_rank=dp_rank,
        dp_size=dp_size,
        kv_endpoint=f"tcp://127.0.0.1:{6000 + dp_rank}",
        page_size=16,
        kv_dtype="bfloat16",
        num_layers=4,
        num_kv_heads=2,
        head_dim=64,
        model_fingerprint="model-a",
        load_balance_method="round_robin",
        registers_all_rooms=True,
    )
    fields.update(overrides)
    return WorkerRegistration(**fields)
