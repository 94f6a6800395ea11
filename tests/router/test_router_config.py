"""`pdserve router`'s command line and RouterConfig: values it cannot serve with are refused
at start, naming the flag or value, never taken and then left failing."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser
from pdserve.config import from_args
from pdserve.router.cli import worker_specs
from pdserve.router.config import RouterConfig, WorkerSpec

DECODE = ["--decode", "http://127.0.0.1:30002"]


def router_config(*argv: str) -> RouterConfig:
    ns = build_parser().parse_args(["router", *argv])
    return from_args(RouterConfig, ns, workers=worker_specs(ns))


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:x", "http://h:0"])
def test_a_worker_url_with_a_port_out_of_range_is_refused(url):
    """urlsplit took any text as the port: the router started with the worker unhealthy
    for good, saying nothing about why (POST /workers took it the same way)."""
    with pytest.raises(ValueError, match="worker URL must look like http://host:port"):
        router_config("--prefill", url, *DECODE)
    with pytest.raises(ValueError, match="port in \\[1, 65535\\]"):
        WorkerSpec(url, "decode")


def test_a_worker_url_may_leave_the_port_to_its_scheme():
    assert WorkerSpec("https://decode.example", "decode").url == "https://decode.example"


def test_a_bootstrap_port_that_is_not_a_number_names_the_flag_and_the_worker():
    """It failed as "invalid literal for int() with base 10: 'abc'"."""
    with pytest.raises(SystemExit, match="--prefill http://127.0.0.1:30001: bootstrap port"):
        router_config("--prefill", "http://127.0.0.1:30001", "abc", *DECODE)
    config = router_config("--prefill", "http://127.0.0.1:30001", "None", *DECODE)
    assert config.workers[0].bootstrap_port is None


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--prometheus-port", "70000"], "--prometheus-port out of range: 70000"),
        (["--prometheus-port", "0"], "--prometheus-port out of range: 0"),
        (["--host", ""], "--host must not be empty"),
        (["--prometheus-host", ""], "--prometheus-host must not be empty"),
    ],
)
def test_a_listener_it_cannot_open_as_asked_is_refused(argv, error):
    """--prometheus-port 70000 or 0 started the router with /metrics on no port it could
    name; --host "" listened on every interface."""
    with pytest.raises(ValueError, match=error):
        router_config("--worker", "http://127.0.0.1:30001", *argv)


def test_a_tokenizer_path_that_is_no_directory_here_is_refused(tmp_path):
    """It was passed over in silence, as a worker's path on another host is: kv_aware then
    routed text prompts by load alone."""
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"--tokenizer-path '{missing}' is not a directory"):
        router_config("--worker", "http://127.0.0.1:30001", "--tokenizer-path", missing)
    config = router_config("--worker", "http://127.0.0.1:30001", "--tokenizer-path", str(tmp_path))
    assert config.tokenizer_path == str(tmp_path)
