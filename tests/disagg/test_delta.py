"""Which pages prefill sends when decode holds a prefix (pure rules of docs/protocol.md section 8)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from pdserve.disagg.delta import delta_error, pages_to_send, prompt_digest


def test_only_the_pages_past_the_cached_prefix_are_sent():
    assert pages_to_send([7, 3, 9, 4], 0, 16) == [7, 3, 9, 4]
    assert pages_to_send([7, 3, 9, 4], 32, 16) == [9, 4]
    assert delta_error(32, 50, 16, 4, 2) is None
    assert delta_error(0, 50, 16, 4, 4) is None
    assert delta_error(48, 49, 16, 4, 1) is None  # all but the last page cached


@pytest.mark.parametrize(
    "num_cached_tokens,prompt_len,num_src,num_dst,needle",
    [
        (8, 50, 4, 4, "not a multiple of the page size 16"),
        (-16, 50, 4, 5, "not a multiple"),
        (48, 48, 3, 0, "leaves nothing of a 48-token prompt"),
        (64, 50, 4, 0, "leaves nothing"),
        (16, 50, 4, 4, "decode holds 1 pages and asks for 4 more, prefill has 4 pages"),
        (0, 50, 4, 3, "asks for 3 more"),
    ],
)
def test_a_page_list_that_does_not_fit_is_refused(
    num_cached_tokens, prompt_len, num_src, num_dst, needle
):
    error = delta_error(num_cached_tokens, prompt_len, 16, num_src, num_dst)
    assert error is not None and needle in error


def test_the_prompt_digest_is_blake2b_over_little_endian_int64_token_ids():
    """The wire format of PageList.prompt_digest, the same on every host."""
    data = struct.pack("<3q", 1, 2, 3)
    expected = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    assert prompt_digest([1, 2, 3]) == expected
    assert prompt_digest([1, 2, 4]) != expected and prompt_digest([1, 2]) != expected
