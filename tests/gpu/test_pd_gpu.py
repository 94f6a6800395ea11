"""Prefill and decode servers on one GPU, or on two GPUs of one host, KV moved GPU to GPU by
the cuda_ipc transport (separate processes, real HTTP and ZeroMQ): greedy tokens equal a
colocated GPU server's."""

from __future__ import annotations

import random

import pytest
import requests
import torch

from tests.conftest import TINY_ARGS
from tests.disagg.conftest import PDFactory
from tests.disagg.pd_driver import check_delta_conversation, pd_generate_async, run_many, wait_idle

GPU = ["--device", "cuda"]
LENGTHS = [1, 5, 16, 17, 40, 100, 257]


def bodies() -> list[dict]:
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in LENGTHS * 2]
    params = {"max_new_tokens": 8, "temperature": 0}
    return [{"input_ids": ids, "sampling_params": params} for ids in prompts]


TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)


@pytest.mark.parametrize(
    "prefill_device,decode_device",
    [("cuda", "cuda"), pytest.param("cuda:0", "cuda:1", marks=TWO_GPUS)],
    ids=["one-gpu", "two-gpus"],
)
def test_pd_over_cuda_ipc_equals_colocated(server_factory, prefill_device, decode_device):
    colocated = server_factory([*TINY_ARGS, *GPU, "--max-running-requests", "16"])
    want = []
    for body in bodies():
        resp = requests.post(colocated.url + "/generate", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        want.append(resp.json()["output_ids"])
    pd = PDFactory()
    try:
        args = ["--transfer-backend", "cuda_ipc"]
        prefill = pd.prefill(1, args=[*args, "--device", prefill_device])
        decode = pd.decode(1, args=[*args, "--device", decode_device])
        results = run_many(
            lambda s: [
                pd_generate_async(
                    s, prefill.url, decode.url, body, bootstrap_port=prefill.bootstrap_port
                )
                for body in bodies()
            ]
        )
        for body, expected, result in zip(bodies(), want, results, strict=True):
            assert result.prefill.ok, result.prefill.error
            assert result.decode.ok, result.decode.error
            assert result.decode.body["output_ids"] == expected, body["input_ids"][:8]
        wait_idle([prefill.url, decode.url])
    finally:
        pd.stop_all()


def test_a_conversation_over_cuda_ipc_moves_only_the_new_pages(server_factory):
    """Decode's prefix cache on the GPU: each turn copies only the pages past what decode
    held, GPU to GPU, and answers the tokens of a GPU server without a prefix cache."""
    reference_server = server_factory([*TINY_ARGS, *GPU, "--disable-radix-cache"])

    def reference(body: dict) -> list[int]:
        resp = requests.post(reference_server.url + "/generate", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()["output_ids"]

    pd = PDFactory()
    try:
        args = [*GPU, "--transfer-backend", "cuda_ipc"]
        prefill = pd.prefill(1, args=args)
        decode = pd.decode(1, args=args)
        check_delta_conversation(prefill.url, decode.url, prefill.bootstrap_port, reference)
    finally:
        pd.stop_all()
