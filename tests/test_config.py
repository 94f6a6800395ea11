"""Values the generated CLI (pdserve/config.py) refuses at the parser: argparse's one-line
error naming the flag, status 2."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser

PARSER = build_parser()


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The last stderr line of parsing `argv`, which must exit with status 2."""
    with pytest.raises(SystemExit) as exited:
        PARSER.parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--mode", "prefill", "--kv-send-wait-s", "inf"],
        ["serve", "--bootstrap-timeout-s", "inf"],
        ["serve", "--request-timeout-s", "Infinity"],
        ["router", "--request-timeout-s", "inf"],
        ["up", "--ready-timeout-s", "inf"],
    ],
)
def test_a_float_flag_refuses_inf(argv, capsys):
    """inf passed every `> 0` check: a prefill server with --kv-send-wait-s inf or
    --bootstrap-timeout-s inf started, then its worker died (OverflowError) on the first
    request or registration."""
    assert refusal(argv, capsys).endswith(
        f"argument {argv[-2]}: expected a finite number, got {argv[-1]!r}"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--worker-start-timeout-s", "1e12"],
        ["serve", "--watchdog-timeout", "2e9"],  # its field is watchdog_timeout_s
        ["router", "--cb-open-s", "1e10"],
    ],
)
def test_a_duration_flag_refuses_more_than_1e9_seconds(argv, capsys):
    """--worker-start-timeout-s 1e12 passed: the server started, then its prefill worker
    exited on an OverflowError (a socket timeout past time_t) registering itself."""
    line = refusal(argv, capsys)
    assert line.endswith(f"argument {argv[-2]}: expected at most 1e+09 seconds, got {argv[-1]!r}")


@pytest.mark.parametrize("value", ["nan", "abc", ""])
def test_a_float_flag_refuses_what_is_not_a_number(value, capsys):
    line = refusal(["router", "--cb-open-s", value], capsys)
    assert line.endswith(f"argument --cb-open-s: expected a number, got {value!r}")


def test_inf_stays_where_it_means_no_limit():
    assert PARSER.parse_args(["bench", "--request-rate", "inf"]).request_rate == float("inf")
    assert PARSER.parse_args(["serve", "--request-timeout-s", "1e3"]).request_timeout_s == 1000.0
