"""The router's prompt token ids equal the servers' for text, completions and chat
(tiny-random's real tokenizer and ChatML template), and are None where it cannot know."""

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
