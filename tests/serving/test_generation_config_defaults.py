"""Sampling fields of a model's generation_config.json are the defaults of requests that omit
them (vLLM's and SGLang's choice): transformers' generate applies its repetition_penalty even
when greedy, so a temperature-0 request must too to give transformers' tokens."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pdserve.engine.model_dir import resolve_model_dir
from pdserve.serving.http_server import _sampling_defaults
from tests.helpers import http_json, launch_server

GENERATION = {"eos_token_id": 2, "repetition_penalty": 1.8, "temperature": 0.5, "top_k": 2.5}
NUM_NEW = 24


@pytest.fixture(scope="module")
def penalized_dir(tmp_path_factory) -> str:
    model_dir = tmp_path_factory.mktemp("gen-config") / "m"
    shutil.copytree(resolve_model_dir("tiny-random"), model_dir)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump(GENERATION, f)
    return str(model_dir)


def test_greedy_tokens_are_those_of_generate_with_the_models_repetition_penalty(penalized_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(penalized_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = torch.tensor([ids])

    def generate(**kw) -> list[int]:
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=NUM_NEW, eos_token_id=None, pad_token_id=0, **kw)  # fmt: skip
        return out[0, len(ids) :].tolist()

    penalized, plain = generate(), generate(repetition_penalty=1.0)
    assert penalized != plain  # else the prompt tells nothing
    sampling = {"max_new_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}
    with launch_server(["--model-path", penalized_dir]) as server:
        body = {"input_ids": ids, "sampling_params": sampling}
        status, out = http_json("POST", server.url + "/generate", body)
        assert status == 200 and out["output_ids"] == penalized, out
        explicit = {**body, "sampling_params": {**sampling, "repetition_penalty": 1.0}}
        assert http_json("POST", server.url + "/generate", explicit)[1]["output_ids"] == plain


def test_a_field_no_request_could_take_is_dropped_and_openai_defaults_ignore_the_file(
    penalized_dir,
):
    defaults = _sampling_defaults("model", penalized_dir)
    assert defaults == {"repetition_penalty": 1.8, "temperature": 0.5}  # top_k 2.5 dropped
    assert _sampling_defaults("openai", penalized_dir) == {}
