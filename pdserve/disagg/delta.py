"""Delta transfer (docs/protocol.md section 8), pure: which of prefill's pages go to decode when
decode already holds the prompt's first `num_cached_tokens` tokens, and the digest by which
both legs show they hold one prompt. Runs in prefill and decode workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def prompt_digest(token_ids: Sequence[int]) -> int:
    """A 64-bit digest of a prompt's token ids. Decode caches the KV it receives under the
    page hashes of its own prompt: KV of another prompt (legs sent different prompts of one
    length) would answer later requests with wrong tokens, so prefill sends none."""
    data = np.asarray(token_ids, dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def delta_error(
    num_cached_tokens: int,
    prompt_len: int,
    page_size: int,
    num_src_pages: int,
    num_dst_pages: int,
) -> str | None:
    """Why prefill must not send: the reason, or None when the pages past
    `num_cached_tokens` of prefill's `num_src_pages` fit decode's `num_dst_pages` exactly."""
    if num_cached_tokens < 0 or num_cached_tokens % page_size:
        return (
            f"num_cached_tokens {num_cached_tokens} is not a multiple of the page size {page_size}"
        )
    if num_cached_tokens > prompt_len - 1:
        return (
            f"num_cached_tokens {num_cached_tokens} leaves nothing of a {prompt_len}-token prompt"
        )
    num_cached_pages = num_cached_tokens // page_size
    if num_src_pages - num_cached_pages != num_dst_pages:
        return (
            f"decode holds {num_cached_pages} pages and asks for {num_dst_pages} more, "
            f"prefill has {num_src_pages} pages"
        )
    return None


def pages_to_send(src_page_ids: list[int], num_cached_tokens: int, page_size: int) -> list[int]:
    """Prefill's pages past the ones decode holds, in prompt order."""
    return src_page_ids[num_cached_tokens // page_size :]
