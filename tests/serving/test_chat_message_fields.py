"""A chat message's `name`, `tool_call_id` and assistant `tool_calls` reach the chat template
as vLLM passes them (tool call arguments as objects); they were dropped, so a conversation
with tool turns reached the model with those turns empty. A tiny-random copy whose template
renders the fields, served and driven with the openai client. Text parts of a message's
content are joined by newlines, as vLLM joins them (they were glued together)."""

from __future__ import annotations

import json
import os
import re
import shutil

import openai
import pytest

from pdserve.engine.model_dir import resolve_model_dir
from pdserve.serving.tokenizer_loader import load_tokenizer
from tests.helpers import launch_server

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}"
    "{% if m.name %} name={{ m.name }}{% endif %}"
    "{% if m.tool_call_id %} id={{ m.tool_call_id }}{% endif %}{{ '\\n' }}{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} "
    "{{ c.function.arguments.city }}</call>{% endfor %}<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
BOS = "<|im_start|>"
CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
}
MESSAGES = [
    {"role": "user", "content": "Weather?", "name": "ann"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "rain", "tool_call_id": "c1"},
]
EXPECTED = (
    "<|im_start|>user name=ann\nWeather?<|im_end|>\n"
    "<|im_start|>assistant\n<call>weather Oslo</call><|im_end|>\n"
    "<|im_start|>tool id=c1\nrain<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("chat-fields") / "m"
    shutil.copytree(resolve_model_dir("tiny-random"), path)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(TEMPLATE)
    # A tokenizer that puts BOS (<|im_start|>, id 1) in front of text, as Llama's does.
    with open(os.path.join(path, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}},
    }  # fmt: skip
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir):
    with launch_server(["--model-path", model_dir]) as server:
        yield server


def test_the_template_sees_names_tool_calls_and_tool_call_ids(model_dir, server):
    tokenizer = load_tokenizer(model_dir)
    expected_ids = tokenizer.encode(EXPECTED, add_special_tokens=False)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model=model_dir, messages=MESSAGES, max_tokens=1, temperature=0
    )
    assert answer.usage.prompt_tokens == len(expected_ids)
    echoed = client.completions.create(
        model=model_dir, prompt=expected_ids, max_tokens=1, temperature=0
    )
    assert answer.choices[0].message.content == echoed.choices[0].text  # the same prompt


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"role": "user", "content": "x", "name": 3}, "messages[0].name must be a string"),
        (
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{"}}]},
            "messages[0].tool_calls[0] must be an object with a function that has a string name",
        ),
        (
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
            },
            "messages[0].tool_calls[0].function.arguments is not valid JSON",
        ),  # fmt: skip
    ],
)
def test_malformed_fields_are_a_400_naming_them(server, model_dir, message, problem):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=re.escape(problem)):
        client.chat.completions.create(model=model_dir, messages=[message], max_tokens=1)


def test_text_parts_are_joined_by_newlines(model_dir, server):
    tokenizer = load_tokenizer(model_dir)
    parts = [{"type": "text", "text": "Read this."}, {"type": "text", "text": "Then that."}]
    expected = "<|im_start|>user\nRead this.\nThen that.<|im_end|>\n<|im_start|>assistant\n"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model=model_dir, messages=[{"role": "user", "content": parts}], max_tokens=1
    )
    assert answer.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
    glued = "<|im_start|>user\nRead this.Then that.<|im_end|>\n<|im_start|>assistant\n"
    assert len(tokenizer.encode(glued, add_special_tokens=False)) != answer.usage.prompt_tokens


def test_add_special_tokens_is_honoured_on_both_routes(model_dir, server):
    """vLLM's `add_special_tokens` (completions: default true; chat: default false, the
    template writes them) was ignored: BOS was always added to a text prompt, never to a
    chat's. usage.prompt_tokens counts the BOS where it is asked for."""
    tokenizer = load_tokenizer(model_dir)
    plain = tokenizer.encode("Hello there", add_special_tokens=False)
    assert tokenizer.encode("Hello there") == [1, *plain]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    def prompt_tokens(create, **fields) -> int:
        return create(model=model_dir, max_tokens=1, **fields).usage.prompt_tokens

    text = {"prompt": "Hello there"}
    assert prompt_tokens(client.completions.create, **text) == len(plain) + 1
    off = {"add_special_tokens": False}
    assert prompt_tokens(client.completions.create, **text, extra_body=off) == len(plain)
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    templated = prompt_tokens(client.chat.completions.create, **chat)
    on = {"add_special_tokens": True}
    assert prompt_tokens(client.chat.completions.create, **chat, extra_body=on) == templated + 1
