"""Chat's `echo` (vLLM's rule): when the last message is the assistant's, the answer of each
choice starts with its text, whole or as the first chunk of a stream; otherwise, or without
`echo`, nothing is added. A tiny-random server."""

from __future__ import annotations

from tests.helpers import http_json, sse_events

PREFIX = "Once upon a time"


def chat(server, messages: list, **extra) -> dict:
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, **extra}
    status, out = http_json("POST", f"{server.url}/v1/chat/completions", body)
    assert status == 200, out
    return out


def contents(answer: dict) -> list[str]:
    return [choice["message"]["content"] for choice in answer["choices"]]


def test_echo_puts_the_assistants_last_message_in_front_of_each_choice(tiny_server):
    messages = [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": PREFIX}]
    plain = contents(chat(tiny_server, messages, n=2, seed=1))
    echoed = contents(chat(tiny_server, messages, n=2, seed=1, echo=True))
    assert echoed == [PREFIX + text for text in plain]


def test_echo_adds_nothing_after_a_user_message_or_when_off(tiny_server):
    messages = [{"role": "user", "content": "tell me"}]
    assert contents(chat(tiny_server, messages, echo=True)) == contents(chat(tiny_server, messages))
    parts = [{"type": "text", "text": "Once "}, {"type": "text", "text": "upon"}]
    with_parts = [*messages, {"role": "assistant", "content": parts}]
    # text parts are joined by newlines, in the prompt and the echo (vLLM's rule)
    assert contents(chat(tiny_server, with_parts, echo=True))[0].startswith("Once \nupon")
    assert not contents(chat(tiny_server, with_parts, echo=False))[0].startswith("Once \nupon")


def test_a_streamed_echo_comes_first_and_the_text_adds_up(tiny_server):
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": PREFIX}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
    events = sse_events(f"{tiny_server.url}/v1/chat/completions", {**body, "echo": True})
    chunks = [e for e in events if e != "[DONE]" and e["choices"]]
    # vLLM's order: the role's opening chunk, then the echo, then the answer
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""},
        {"content": PREFIX},
    ]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == PREFIX + contents(chat(tiny_server, messages))[0]


def test_echo_must_be_a_boolean(tiny_server):
    body = {"messages": [{"role": "user", "content": "x"}], "echo": "yes", "max_tokens": 2}
    status, out = http_json("POST", f"{tiny_server.url}/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == "echo", out


def test_add_generation_prompt_and_continue_final_message_reach_the_template(tiny_server):
    """vLLM's turn fields (they were ignored: every answer began a new assistant turn):
    with `continue_final_message` the answer continues the assistant's last message, the
    tokens /generate gives for that prompt rendered open; chat_template_kwargs override."""
    from pdserve.engine.model_dir import resolve_model_dir
    from pdserve.serving.tokenizer_loader import load_tokenizer

    messages = [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": PREFIX}]
    tokenizer = load_tokenizer(resolve_model_dir("tiny-random"))
    open_turn = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    prompt_ids = tokenizer.encode(open_turn, add_special_tokens=False)
    body = {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    status, want = http_json("POST", f"{tiny_server.url}/generate", body)
    assert status == 200, want
    turn = {"add_generation_prompt": False, "continue_final_message": True}
    got = chat(tiny_server, messages, **turn)
    assert got["usage"]["prompt_tokens"] == len(prompt_ids)
    assert contents(got) == [want["text"]]
    assert contents(chat(tiny_server, messages, chat_template_kwargs=turn)) == [want["text"]]
    closed = chat(tiny_server, messages, add_generation_prompt=False)["usage"]["prompt_tokens"]
    opened = chat(tiny_server, messages)["usage"]["prompt_tokens"]
    assert len(prompt_ids) < closed < opened
    # Without a new turn the answer continues the last message, whoever's: echo gives it.
    user_last = messages[:1]
    echoed = chat(tiny_server, user_last, add_generation_prompt=False, echo=True)
    assert contents(echoed)[0].startswith("tell me")


def test_turn_fields_that_cannot_be_honoured_are_a_400(tiny_server):
    url = f"{tiny_server.url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for extra, param in [
        ({"continue_final_message": True}, "continue_final_message"),  # with the default turn
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
        ({"chat_template": "{{ 'x' }}"}, "chat_template"),  # vLLM: only when trusted
    ]:
        status, out = http_json("POST", url, {**body, **extra})
        assert status == 400 and out["error"]["param"] == param, out
