"""Request parsing (pure): every bad field is a 400 naming it; batches split into items."""

from __future__ import annotations

import pytest

from pdserve.serving.hooks import RequestError
from pdserve.serving.request_parse import Limits, parse_generate

LIMITS = Limits(dp_size=2, max_context_len=64, vocab_size=256)


class ByteTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())


def parse(body):
    return parse_generate(body, ByteTokenizer(), LIMITS)


def test_single_text_and_batch_input_ids():
    items, is_batch = parse({"text": "hi", "sampling_params": {"max_new_tokens": 4}})
    assert not is_batch and items[0].input_ids == [104, 105]
    assert items[0].sampling.max_new_tokens == 4
    items, is_batch = parse(
        {"input_ids": [[1, 2], [3]], "bootstrap_room": [10, 11], "rid": ["a", "b"]}
    )
    assert is_batch and [i.input_ids for i in items] == [[1, 2], [3]]
    assert [i.pd.room for i in items] == [10, 11] and [i.rid for i in items] == ["a", "b"]


def test_unknown_fields_are_ignored_and_routed_rank_alias_is_read():
    items, _ = parse({"text": "x", "log_metrics": True, "model": None, "data_parallel_rank": 1})
    assert items[0].pd.routed_dp_rank == 1


def test_default_max_new_tokens_is_clamped_to_the_context():
    items, _ = parse({"input_ids": list(range(60))})
    assert items[0].sampling.max_new_tokens == 4


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([1, 2], "JSON object"),
        ({}, "exactly one of text or input_ids"),
        ({"text": "a", "input_ids": [1]}, "exactly one of text or input_ids"),
        ({"text": 5}, "text must be"),
        ({"text": ""}, "empty"),
        ({"input_ids": []}, "empty"),
        ({"input_ids": ["a"]}, "input_ids"),
        ({"input_ids": [1, 999]}, "vocabulary"),
        ({"input_ids": list(range(64))}, "context length"),
        ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"text": "a", "sampling_params": {"max_new_tokens": 10**9}}, "exceeds the context"),
        ({"text": "a", "sampling_params": {"max_new_tokens": "5"}}, "max_new_tokens"),
        ({"text": "a", "sampling_params": {"temperature": -1}}, "temperature"),
        ({"text": "a", "sampling_params": {"temperature": float("nan")}}, "temperature"),
        ({"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"text": "a", "sampling_params": [1]}, "sampling_params"),
        ({"text": "a", "return_logprob": "yes"}, "return_logprob"),
        ({"text": "a", "top_logprobs_num": "3"}, "top_logprobs_num"),
        ({"text": "a", "routed_dp_rank": 2}, "routed_dp_rank"),
        ({"text": "a", "data_parallel_rank": "0"}, "data_parallel_rank"),
        ({"text": "a", "bootstrap_room": -5}, "bootstrap_room"),
        ({"text": "a", "bootstrap_room": 2**63}, "bootstrap_room"),
        ({"text": ["a", "b"], "bootstrap_room": [1]}, "bootstrap_room has 1 entries"),
        ({"text": "a", "rid": 7}, "rid"),
    ],
)
def test_bad_input_is_a_400_naming_the_problem(body, needle):
    with pytest.raises(RequestError) as info:
        parse(body)
    assert info.value.status == 400
    assert needle in info.value.message


def test_logit_bias_takes_string_and_int_keys_and_checks_ids_only_against_a_known_vocab():
    def bias(limits: Limits, value: dict) -> dict[int, float]:
        body = {"input_ids": [1, 2], "sampling_params": {"logit_bias": value}}
        return parse_generate(body, None, limits)[0][0].sampling.logit_bias

    assert bias(LIMITS, {"7": 1, 9: -100}) == {7: 1.0, 9: -100.0}
    with pytest.raises(RequestError, match=r"token id 300 is outside the vocabulary \[0, 256\)"):
        bias(LIMITS, {"300": 1})
    unknown = Limits(dp_size=1, max_context_len=64)  # vocab size None: no bound but >= 0
    assert bias(unknown, {"300": 1}) == {300: 1.0}
    with pytest.raises(RequestError, match="token id -3 is outside the vocabulary"):
        bias(unknown, {"-3": 1})
