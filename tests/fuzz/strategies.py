"""Hypothesis strategies for request bodies: known field names with values of every JSON kind,
in valid and invalid shapes, plus raw bytes that are not JSON at all. Sizes stay small so
that a valid body is a cheap request (a few tokens of tiny-random)."""

from __future__ import annotations

from hypothesis import strategies as st

# integers at the edges the parsers must reject, but none that are valid and expensive
EDGE_INTS = st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
SMALL_INTS = st.integers(-3, 12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    SMALL_INTS,
    EDGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, 300), EDGE_INTS, SCALARS), min_size=0, max_size=8)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A value for a known field: mostly a plausible one, sometimes anything."""
    return st.one_of(valid, JSON)


SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": field(SMALL_INTS),
        "temperature": field(st.floats(0, 2)),
        "top_p": field(st.floats(0, 1)),
        "top_k": field(SMALL_INTS),
        "min_p": field(st.floats(0, 1)),
        "stop": field(st.lists(st.text(max_size=4), max_size=2)),
        "stop_token_ids": field(st.lists(st.integers(0, 300), max_size=3)),
        "ignore_eos": field(st.booleans()),
        "seed": field(SMALL_INTS),
        "n": field(SMALL_INTS),
    },
)


def generate_body(pd_fields: st.SearchStrategy) -> st.SearchStrategy:
    """A native /generate body; `pd_fields` gives the routing fields a role may get."""
    return st.fixed_dictionaries(
        {},
        optional={
            "text": field(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3))),
            "input_ids": field(st.one_of(TOKEN_IDS, st.lists(TOKEN_IDS, max_size=3))),
            "sampling_params": field(st.one_of(SAMPLING, st.lists(SAMPLING, max_size=2))),
            "stream": field(st.booleans()),
            "rid": field(st.text(max_size=8)),
            "return_logprob": field(st.booleans()),
            "logprob_start_len": field(SMALL_INTS),
            "top_logprobs_num": field(SMALL_INTS),
        },
    ).flatmap(lambda body: pd_fields.map(lambda extra: {**body, **extra}))  # fmt: skip


def openai_body(chat: bool, pd_fields: st.SearchStrategy) -> st.SearchStrategy:
    message = st.fixed_dictionaries(
        {"role": field(st.sampled_from(["user", "system", "assistant", "tool"]))},
        optional={"content": field(st.text(max_size=30))},
    )
    prompt = ("messages", field(st.lists(message, max_size=3))) if chat else (
        "prompt", field(st.one_of(st.text(max_size=40), TOKEN_IDS, st.lists(st.text(max_size=8), max_size=2))))  # fmt: skip
    return st.fixed_dictionaries(
        {},
        optional={
            prompt[0]: prompt[1],
            "model": field(st.sampled_from(["tiny-random", "other"])),
            "max_tokens": field(SMALL_INTS),
            "max_completion_tokens": field(SMALL_INTS),
            "n": field(SMALL_INTS),
            "stream": field(st.booleans()),
            "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
            "logprobs": field(st.one_of(st.booleans(), SMALL_INTS)),
            "top_logprobs": field(SMALL_INTS),
            "echo": field(st.booleans()),
            "temperature": field(st.floats(0, 2)),
            "stop": field(
                st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=2))
            ),
            "chat_template_kwargs": JSON,
        },
    ).flatmap(lambda body: pd_fields.map(lambda extra: {**body, **extra}))


# Routing fields for a lone PD server: never a well-formed room, so no leg waits for a peer
# that will not come (that is a deadline, tested elsewhere, not garbage).
BAD_ROOMS = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=2**63), st.text(max_size=6),
    st.floats(), st.booleans(), st.lists(SMALL_INTS, max_size=2),
)  # fmt: skip
PD_GARBAGE = st.fixed_dictionaries(
    {},
    optional={
        "bootstrap_room": BAD_ROOMS,
        "bootstrap_host": field(st.sampled_from(["127.0.0.1", "", "no-such-host.invalid"])),
        "bootstrap_port": field(st.integers(-1, 70000)),
        "routed_dp_rank": field(SMALL_INTS),
        "data_parallel_rank": field(SMALL_INTS),
        "disagg_prefill_dp_rank": field(SMALL_INTS),
        "disagg_local_prefill": field(st.one_of(st.booleans(), SMALL_INTS)),
    },
)
NO_FIELDS = st.just({})

RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"a":', b"\xff\xfe", b"[" * 3000 + b"]" * 3000]),
)


def tokenize_body() -> st.SearchStrategy:
    """A /tokenize or /detokenize body: either form's fields, plausible or anything."""
    message = st.fixed_dictionaries(
        {"role": field(st.sampled_from(["user", "assistant"]))},
        optional={"content": field(st.text(max_size=20))},
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "prompt": field(st.text(max_size=30)),
            "messages": field(st.lists(message, max_size=2)),
            "tokens": field(TOKEN_IDS),
            "model": field(st.sampled_from(["tiny-random", "other"])),
            "add_special_tokens": field(st.booleans()),
            "add_generation_prompt": field(st.booleans()),
            "return_token_strs": field(st.booleans()),
        },
    )
