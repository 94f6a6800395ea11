"""--dtype auto (the default): a server runs a model in the dtype its checkpoint names, as
vLLM's and SGLang's do; one it cannot run fails the start with a message."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.model_dir import checkpoint_dtype
from tests.engine.families import build_served
from tests.helpers import http_json, launch_server
from tests.serving.test_dp import run_serve


def _write_config(path, **fields) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", **fields}, f)
    return str(path)


@pytest.mark.parametrize(
    "fields, dtype",
    [
        ({"dtype": "bfloat16"}, "bfloat16"),  # transformers 5
        ({"torch_dtype": "float16"}, "float16"),  # transformers 4
        ({"dtype": "bfloat16", "torch_dtype": "float32"}, "bfloat16"),
        ({}, "float32"),
    ],
)
def test_the_checkpoint_dtype_is_the_one_config_json_names(tmp_path, fields, dtype) -> None:
    assert checkpoint_dtype(_write_config(tmp_path, **fields)) == dtype


def test_a_checkpoint_dtype_the_engine_does_not_run_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(ValueError, match="'float8_e4m3fn' is not one pdserve runs"):
        checkpoint_dtype(_write_config(tmp_path, torch_dtype="float8_e4m3fn"))


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> str:
    """A Qwen3 checkpoint saved in bfloat16 (its config.json says so)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("bf16-qwen3")
    build_served(path, "qwen3")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(str(path))
    assert checkpoint_dtype(str(path)) == "bfloat16"
    return str(path)


def test_a_bf16_checkpoint_is_served_in_bf16_by_default(bf16_model) -> None:
    with launch_server(["--model-path", bf16_model]) as server:
        status, info = http_json("GET", f"{server.url}/get_server_info")
        assert status == 200 and info["dtype"] == "bfloat16"
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        status, out = http_json("POST", f"{server.url}/generate", body)
        assert status == 200 and out["meta_info"]["completion_tokens"] == 4


def test_a_dtype_given_overrides_the_checkpoints(bf16_model) -> None:
    given = EngineConfig(model_path=bf16_model, dtype="float32")
    assert given.with_dtype() is given
    assert EngineConfig(model_path=bf16_model).with_dtype().dtype == "bfloat16"


def test_a_server_whose_checkpoint_dtype_it_cannot_run_fails_to_start(tmp_path) -> None:
    model_dir = build_served(tmp_path, "qwen3")
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["dtype"] = config["torch_dtype"] = "float8_e4m3fn"
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    done = run_serve(["--model-path", model_dir])
    assert done.returncode == 1, done.stderr
    assert "server failed to start: --dtype auto: the checkpoint's dtype" in done.stderr
    assert "Traceback" not in done.stderr
