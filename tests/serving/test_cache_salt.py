"""The prefix-cache salt of a request body (pure): vLLM's `cache_salt` rule, SGLang's
`extra_key` rule, and the combination of both, read alike by server and router."""

from __future__ import annotations

import pytest

from pdserve.serving.cache_salt import CacheSaltError, body_cache_salt, body_salt_key, salt_key


@pytest.mark.parametrize(
    ("body", "salt"),
    [
        ({}, None),
        ({"cache_salt": None, "extra_key": None}, None),
        ({"cache_salt": "tenant"}, ("tenant",)),
        ({"extra_key": "tenant"}, ("tenant",)),  # SGLang's name for the same salt
        ({"extra_key": ""}, None),  # SGLang: an empty key asks for none
        ({"cache_salt": "ab", "extra_key": "c"}, ("ab", "c")),
        ({"cache_salt": "a", "extra_key": ""}, ("a",)),
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


def test_workers_get_a_fixed_size_key_of_the_salt():
    """A salt of any length goes on as its 32-character key (a MiB salt had gone whole to
    the workers with every sequence of a batch); one salt by either name, one key; another
    salt, another key."""
    long_salt = "s" * 2**20
    key = body_salt_key({"cache_salt": long_salt})
    assert key == salt_key(long_salt) and len(key) == 32
    assert body_salt_key({"extra_key": long_salt}) == key
    assert body_salt_key({"cache_salt": long_salt + "!"}) != key
    assert body_salt_key({"cache_salt": "a", "extra_key": "b"}) == salt_key("a", "b")
    assert body_salt_key({"extra_key": ""}) is None
    assert len(salt_key("\ud800")) == 32  # the router's parser lets a lone surrogate through


def test_no_two_salts_share_a_key():
    """Both fields once joined by a NUL: ("a", "b") and the one salt "a\x00b" shared pages."""
    bodies = [
        {"cache_salt": "a\x00b"},
        {"cache_salt": "a", "extra_key": "b"},
        {"cache_salt": "a\x00", "extra_key": "b"},
        {"cache_salt": "ab", "extra_key": "c"},
        {"cache_salt": "a", "extra_key": "bc"},
        {"cache_salt": "a"},
        {"cache_salt": "2"},
    ]
    assert len({body_salt_key(body) for body in bodies}) == len(bodies)
