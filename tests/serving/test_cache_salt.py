"""The prefix-cache salt of a request body (pure): vLLM's `cache_salt` rule, SGLang's
`extra_key` rule, and the combination of both, read alike by server and router."""

from __future__ import annotations

import pytest

from pdserve.serving.cache_salt import CacheSaltError, body_cache_salt


@pytest.mark.parametrize(
    ("body", "salt"),
    [
        ({}, None),
        ({"cache_salt": None, "extra_key": None}, None),
        ({"cache_salt": "tenant"}, "tenant"),
        ({"extra_key": "tenant"}, "tenant"),  # SGLang's name for the same salt
        ({"extra_key": ""}, None),  # SGLang: an empty key asks for none
        ({"cache_salt": "ab", "extra_key": "c"}, "ab\x00c"),
        ({"cache_salt": "a", "extra_key": "bc"}, "a\x00bc"),
        ({"cache_salt": "a", "extra_key": ""}, "a"),
    ],
)
def test_a_body_names_its_salt(body, salt):
    assert body_cache_salt(body) == salt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"cache_salt": ""}, "cache_salt"),  # vLLM: a non-empty string if provided
        ({"cache_salt": 5}, "cache_salt"),
        ({"cache_salt": ["a"]}, "cache_salt"),
        ({"extra_key": 5}, "extra_key"),
        ({"extra_key": True}, "extra_key"),
        ({"cache_salt": "a", "extra_key": {"k": 1}}, "extra_key"),
    ],
)
def test_a_salt_that_is_not_a_string_is_refused_naming_its_field(body, param):
    with pytest.raises(CacheSaltError) as caught:
        body_cache_salt(body)
    assert caught.value.param == param
