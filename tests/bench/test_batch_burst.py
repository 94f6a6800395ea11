"""The batch-burst benchmark's client against a real server: one /v1/completions batch, its
status, time and choices; a refused batch reports the server's error."""

from __future__ import annotations

from pdserve.bench.batch_burst import run_batch


def test_one_batch_is_one_request_with_a_choice_per_prompt(tiny_server):
    result = run_batch(tiny_server.url, num_prompts=5, max_tokens=2, timeout_s=60)
    assert result["status"] == 200 and result["choices"] == 5, result
    assert result["seconds"] > 0


def test_a_refused_batch_reports_the_servers_error(tiny_server):
    result = run_batch(tiny_server.url, num_prompts=2, max_tokens=-1, timeout_s=60)
    assert result["status"] == 400 and "max_tokens" in result["error"], result
