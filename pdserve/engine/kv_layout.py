"""The shape of an engine's KV pool: what two engines must agree on before pages move
between them. Plain data, used in worker processes and front ends alike.
"""

from __future__ import annotations

import msgspec


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """What both sides must agree on before any page moves."""

    page_size: int
    kv_dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_fingerprint: str

    def mismatch(self, other: KVLayout) -> str | None:
        """A message naming every differing field and both values, or None if compatible."""
        diffs = [
            f"{name}: decode={getattr(other, name)!r} prefill={getattr(self, name)!r}"
            for name in self.__struct_fields__
            if getattr(self, name) != getattr(other, name)
        ]
        return "KV layout mismatch: " + "; ".join(diffs) if diffs else None
