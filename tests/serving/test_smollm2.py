"""The default model, SmolLM2-135M-Instruct, answers a factual question through the server."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.helpers import http_json, launch_server

QUESTION = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 24,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def smollm_server():
    with launch_server(["--model-path", "smollm2-135m-instruct"], timeout_s=600) as server:
        yield server


@pytest.mark.slow
def test_smollm2_says_paris(smollm_server):
    status, out = http_json("POST", f"{smollm_server.url}/v1/chat/completions", QUESTION)
    assert status == 200, out
    assert "Paris" in out["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_smollm2_says_paris_streaming(smollm_server):
    req = urllib.request.Request(
        f"{smollm_server.url}/v1/chat/completions",
        json.dumps({**QUESTION, "stream": True}).encode(),
        {"Content-Type": "application/json"},
    )
    text = ""
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: ") :])["choices"]:
                    text += choice["delta"].get("content", "")
    assert "Paris" in text
