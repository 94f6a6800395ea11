"""The router's prompt token ids equal the servers' for text, completions and chat
(tiny-random's real tokenizer and ChatML template), and are None where it cannot know."""

import json
import os
import shutil

import pytest

from pdserve.engine.model_dir import resolve_model_dir
from pdserve.router.body import CHAT, COMPLETIONS, GENERATE
from pdserve.router.prompt_tokens import _load, prompt_token_ids
from pdserve.serving.openai_format import render_chat_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return _load(resolve_model_dir("tiny-random"))


def test_text_prompts_are_encoded_as_the_servers_do(tokenizer):
    text = "The wind comes from the west most days."
    expected = tokenizer.encode(text)
    assert len(expected) > 3
    assert prompt_token_ids(GENERATE, {"text": text}, tokenizer) == expected
    assert prompt_token_ids(GENERATE, {"text": [text, "other"]}, tokenizer) == expected
    assert prompt_token_ids(COMPLETIONS, {"prompt": text}, tokenizer) == expected
    assert prompt_token_ids(COMPLETIONS, {"prompt": [text]}, tokenizer) == expected


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """tiny-random's tokenizer putting a BOS (id 1) in front of text, as Llama's does."""
    path = tmp_path_factory.mktemp("bos") / "m"
    source = resolve_model_dir("tiny-random")
    path.mkdir()
    for name in os.listdir(source):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(source, name), path / name)
    with open(path / "tokenizer.json") as f:
        spec = json.load(f)
    bos = "<|im_start|>"
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}},
    }  # fmt: skip
    with open(path / "tokenizer.json", "w") as f:
        json.dump(spec, f)
    return _load(str(path))


def test_completions_follow_add_special_tokens(bos_tokenizer):
    """vLLM's field, as the server reads it: the router hashed a prompt sent without BOS
    with one, so it matched no cached page of it."""
    text = "The wind comes from the west most days."
    with_bos = bos_tokenizer.encode(text)
    assert with_bos[0] == 1
    without = bos_tokenizer.encode(text, add_special_tokens=False)
    assert without == with_bos[1:]
    assert prompt_token_ids(COMPLETIONS, {"prompt": text}, bos_tokenizer) == with_bos
    body = {"prompt": [text], "add_special_tokens": False}
    assert prompt_token_ids(COMPLETIONS, body, bos_tokenizer) == without
    body = {"text": text, "add_special_tokens": False}  # not a /generate field
    assert prompt_token_ids(GENERATE, body, bos_tokenizer) == with_bos
    body = {"prompt": text, "add_special_tokens": "no"}  # the server answers 400
    assert prompt_token_ids(COMPLETIONS, body, bos_tokenizer) is None


def test_chat_messages_go_through_the_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Rain today?"}]},
    ]
    ids = prompt_token_ids(CHAT, {"messages": messages}, tokenizer)
    assert ids == render_chat_prompt(tokenizer, messages, {})
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (GENERATE, {"input_ids": [1, 2, 3]}),  # already token ids
        (COMPLETIONS, {"prompt": [[1, 2], [3]]}),
        (GENERATE, {}),
        (CHAT, {"messages": []}),  # the server answers these with a 400
        (CHAT, {"messages": [{"content": "no role"}]}),
        (CHAT, {"messages": "not a list"}),
    ],
)
def test_no_token_ids_where_the_router_cannot_know_them(tokenizer, route, body):
    assert prompt_token_ids(route, body, tokenizer) is None
