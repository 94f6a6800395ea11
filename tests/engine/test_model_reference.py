"""Numerics against transformers: random-weight Llama (GQA, untied, llama3/linear rope; and
head_dim != hidden / heads with one KV head), Qwen2 (q/k/v bias, tied), Qwen3 (q/k norm),
Qwen3-MoE and Mixtral models saved to disk and loaded by pdserve; fp32 logits agree and
greedy generation matches `generate` token for token at batch 1 and batch 8."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.request import Request, SamplingParams
from tests.engine.conftest import VOCAB, make_engine

NUM_NEW = 40
# Shorter than a page, exactly one, just over, several, and longer than a prefill chunk (64).
PROMPT_LENS = [1, 5, 16, 17, 33, 64, 100, 150]


def prompt(length: int, salt: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(length * 31 + salt)
    return torch.randint(3, VOCAB, (length,), generator=gen).tolist()


@pytest.fixture(scope="module")
def hf_model(ref_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref_model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate exactly NUM_NEW tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], num_new: int = NUM_NEW) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()


def run_all(engine, reqs: list[Request]) -> dict[str, list]:
    for r in reqs:
        engine.add_request(r)
    outs: dict[str, list] = {r.rid: [] for r in reqs}
    while engine.has_work():
        for o in engine.step():
            outs[o.rid].append(o)
    return outs


def greedy_req(rid: str, prompt_ids: list[int], **kw) -> Request:
    params = SamplingParams(max_new_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    return Request(rid, prompt_ids, params, **kw)


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def test_prompt_and_decode_logprobs_match_transformers(ref_model_dir, hf_model):
    engine = make_engine(ref_model_dir)
    ids = prompt(150)  # three prefill chunks
    req = greedy_req("r", ids, return_logprob=True, logprob_start_len=0, top_logprobs_num=5)
    outs = run_all(engine, [req])["r"]
    generated = tokens(outs)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + generated])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    prompt_lps = outs[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(ids)
    expected_prompt = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(prompt_lps[1:]), expected_prompt, atol=1e-4)
    top = outs[0].prompt_top_logprobs[7]
    assert [t for t, _ in top] == ref[6].topk(5).indices.tolist()
    decode_lps = [lp for o in outs for lp in o.new_token_logprobs]
    positions = torch.arange(len(ids) - 1, len(ids) - 1 + len(generated))
    expected_decode = ref[positions, torch.tensor(generated)]
    assert torch.allclose(torch.tensor(decode_lps), expected_decode, atol=1e-4)


def test_greedy_matches_generate_at_batch_1(ref_model_dir, hf_model):
    engine = make_engine(ref_model_dir)
    for length in (5, 16, 100):
        ids = prompt(length)
        got = tokens(run_all(engine, [greedy_req(f"b1-{length}", ids)])[f"b1-{length}"])
        assert got == hf_greedy(hf_model, ids), f"prompt length {length}"
    assert engine.num_used_pages == 0


def test_greedy_matches_generate_at_batch_8_with_mixed_lengths(ref_model_dir, hf_model):
    engine = make_engine(ref_model_dir)
    prompts = {f"b8-{n}": prompt(n, salt=1) for n in PROMPT_LENS}
    outs = run_all(engine, [greedy_req(rid, ids) for rid, ids in prompts.items()])
    for rid, ids in prompts.items():
        assert tokens(outs[rid]) == hf_greedy(hf_model, ids), rid
    assert engine.num_used_pages == 0
