"""Chained hashes of a token sequence's full KV pages (pure: no torch, no I/O).

Page i's hash covers page i-1's hash and page i's token ids, so one hash names a whole
prefix. Stable across processes and machines: workers key their prefix cache with it and a
router can hash a prompt the same way. A request's cache salt (vLLM's `cache_salt`, SGLang's
`extra_key`) changes its seed, hence every page hash: salted pages match only their own salt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

HASH_BYTES = 8
_TOKEN_DTYPE = np.dtype("<i8")  # little-endian int64 on every machine


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=HASH_BYTES).digest(), "little")


def hash_seed(model_fingerprint: str, page_size: int) -> int:
    """The parent hash of a sequence's first page: equal seeds mean the same model and
    page size, so equal page hashes mean equal KV."""
    return _digest(f"pdserve-kv-pages/{model_fingerprint}/{page_size}".encode())


def salted_seed(seed: int, salt: str | None) -> int:
    """The seed of a request salted with `salt`: `seed` itself without one (unsalted pages
    hash as they always did), else a digest of both under a prefix of its own, so no salt
    gives the input of an unsalted seed. Servers and the router pass the salt's fixed-size
    key (serving/cache_salt.py); workers keep the result per request."""
    if salt is None:
        return seed
    salt_bytes = salt.encode("utf-8", "surrogatepass")  # total: any str a parser made
    return _digest(b"pdserve-cache-salt/" + seed.to_bytes(HASH_BYTES, "little") + salt_bytes)


def page_hashes(
    token_ids: Sequence[int], page_size: int, seed: int, known: Sequence[int] = ()
) -> list[int]:
    """Hashes of every full page of `token_ids`. `known` are already computed hashes of its
    first pages (they are kept, not recomputed), so a growing sequence hashes each page once."""
    num_full = len(token_ids) // page_size
    hashes = list(known[:num_full])
    if len(hashes) == num_full:
        return hashes
    start = len(hashes) * page_size
    tokens = np.asarray(token_ids[start : num_full * page_size], dtype=_TOKEN_DTYPE).tobytes()
    page_nbytes = page_size * _TOKEN_DTYPE.itemsize
    parent = hashes[-1] if hashes else seed
    for offset in range(0, len(tokens), page_nbytes):
        parent = _digest(
            parent.to_bytes(HASH_BYTES, "little") + tokens[offset : offset + page_nbytes]
        )
        hashes.append(parent)
    return hashes
