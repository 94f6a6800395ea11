"""Environment variables (pdserve/envs.py): a value pdserve cannot read is an error naming
the variable, never silently the default, and `pdserve` reports it in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve import envs
from tests.helpers import python_path_env

FORCE = "PDSERVE_FORCE_QUERY_PREFILL_DP_RANK"
SGLANG_FORCE = "SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), (" 1 ", True), ("TRUE", True), ("on", True), ("0", False), ("off", False)],
)
def test_a_boolean_variable_takes_the_usual_spellings(monkeypatch, value, expected):
    monkeypatch.setenv(FORCE, value)
    assert envs.force_query_prefill_dp_rank() is expected


@pytest.mark.parametrize("value", ["abc", "-1", "1.0", "2"])
def test_a_boolean_variable_with_another_value_is_an_error_naming_it(monkeypatch, value):
    """These read as false, silently: FORCE=1.0 left the fast path on."""
    monkeypatch.setenv(SGLANG_FORCE, value)
    with pytest.raises(envs.EnvError, match=f"{SGLANG_FORCE}={value!r}"):
        envs.force_query_prefill_dp_rank()


def test_an_empty_variable_is_unset_and_ours_wins_over_sglangs(monkeypatch):
    monkeypatch.setenv(FORCE, "")
    monkeypatch.setenv(SGLANG_FORCE, "1")
    assert envs.force_query_prefill_dp_rank() is True
    monkeypatch.setenv(FORCE, "0")
    assert envs.force_query_prefill_dp_rank() is False


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-inf", "1e12"])
def test_a_number_variable_must_be_a_finite_number(monkeypatch, value):
    monkeypatch.setenv("PDSERVE_ROOM_TTL_S", value)
    with pytest.raises(envs.EnvError, match=f"PDSERVE_ROOM_TTL_S={value!r}"):
        envs.room_ttl_s()
    monkeypatch.setenv("PDSERVE_ROOM_TTL_S", " 7.5 ")
    assert envs.room_ttl_s() == 7.5


@pytest.mark.parametrize(
    ("command", "name", "value"),
    [
        ("bench", "PDSERVE_BOOTSTRAP_TIMEOUT_S", "abc"),
        ("serve", FORCE, "maybe"),
    ],
)
def test_pdserve_names_a_bad_variable_in_one_line_with_status_2(command, name, value):
    """A traceback from the config modules' import, before any parser ran (even `--help`)."""
    env = {**python_path_env(), name: value}
    done = subprocess.run(
        [sys.executable, "-m", "pdserve", command, "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"pdserve: {name}={value!r}: expected"), done.stderr
    assert "Traceback" not in done.stderr


def test_a_key_from_the_environment_that_cannot_travel_names_the_variable_too():
    """It said "--api-key must be ..." to a user who had given no such flag."""
    env = {**python_path_env(), "PDSERVE_API_KEY": "two words"}
    done = subprocess.run(
        [sys.executable, "-m", "pdserve", "router", "--worker", "http://127.0.0.1:9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "--api-key (or env PDSERVE_API_KEY) must be non-empty visible ASCII" in done.stderr
