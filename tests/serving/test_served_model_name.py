"""`--served-model-name`: the OpenAI routes answer to it and to the --model-path value,
/v1/models lists both (served name first), and any other name gets a 404. Several names
(vLLM's form): each is accepted, answers give the first."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import http_json, launch_server

ROUTES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2, "temperature": 0},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "temperature": 0,
    },
}


@pytest.fixture(scope="module")
def named_server():
    with launch_server(["--model-path", "tiny-random", "--served-model-name", "my-llm"]) as srv:
        yield srv


def test_models_lists_the_served_name_first_then_its_alias(named_server):
    status, models = http_json("GET", named_server.url + "/v1/models")
    assert status == 200
    assert [card["id"] for card in models["data"]] == ["my-llm", "tiny-random"]
    assert http_json("GET", named_server.url + "/server_info")[1]["served_model_name"] == "my-llm"


@pytest.mark.parametrize("route", ROUTES)
def test_the_served_name_and_its_alias_are_accepted_and_answered_as_the_served_name(
    named_server, route
):
    for name in ("my-llm", "tiny-random", None):
        status, out = http_json("POST", named_server.url + route, {**ROUTES[route], "model": name})
        assert status == 200 and out["model"] == "my-llm", (name, out)


@pytest.mark.parametrize("route", ROUTES)
def test_another_name_is_not_found(named_server, route):
    status, out = http_json("POST", named_server.url + route, {**ROUTES[route], "model": "m"})
    assert status == 404 and out["error"]["message"] == "The model `m` does not exist.", out
    assert out["error"]["type"] == "NotFoundError"


def test_the_openai_client_raises_not_found_for_another_name(named_server):
    client = openai.OpenAI(base_url=named_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist."):
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    reply = client.chat.completions.create(
        model="my-llm", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert reply.model == "my-llm"


def test_several_served_names_are_each_accepted_and_answered_as_the_first():
    names = ["alpha", "beta"]
    with launch_server(["--model-path", "tiny-random", "--served-model-name", *names]) as srv:
        status, models = http_json("GET", srv.url + "/v1/models")
        assert status == 200
        assert [card["id"] for card in models["data"]] == [*names, "tiny-random"]
        assert http_json("GET", srv.url + "/server_info")[1]["served_model_name"] == "alpha"
        for route, body in ROUTES.items():
            for name in ("beta", "alpha", "tiny-random"):
                status, out = http_json("POST", srv.url + route, {**body, "model": name})
                assert status == 200 and out["model"] == "alpha", (route, name, out)
            status, _ = http_json("POST", srv.url + route, {**body, "model": "gamma"})
            assert status == 404


def test_an_empty_served_name_is_refused_at_start():
    from tests.serving.test_dp import run_serve

    done = run_serve(["--model-path", "tiny-random", "--served-model-name", "a", ""])
    assert done.returncode != 0 and "--served-model-name: a name must not be empty" in done.stderr


def test_retrieve_model_answers_each_served_name_and_404s_another(named_server):
    """OpenAI's `GET /v1/models/{model}` (it was a 404 for every name): the card /v1/models
    lists for that name; another name gets vLLM's 404, in OpenAI's shape."""
    listed = http_json("GET", named_server.url + "/v1/models")[1]["data"]
    for card in listed:
        status, out = http_json("GET", f"{named_server.url}/v1/models/{card['id']}")
        assert status == 200 and out == {**card, "created": out["created"]}, out
    status, out = http_json("GET", named_server.url + "/v1/models/org/other-model")
    assert status == 404 and out["error"]["type"] == "NotFoundError", out
    assert out["error"]["message"] == "The model `org/other-model` does not exist."
    client = openai.OpenAI(base_url=named_server.url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("my-llm").id == "my-llm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("route", ["/tokenize", "/detokenize"])
def test_tokenize_routes_take_the_served_names_and_404_another(named_server, route):
    body = {"prompt": "hi"} if route == "/tokenize" else {"tokens": [5, 6]}
    for name in ("my-llm", "tiny-random", None):
        status, out = http_json("POST", named_server.url + route, {**body, "model": name})
        assert status == 200, (name, out)
    status, out = http_json("POST", named_server.url + route, {**body, "model": "m"})
    assert status == 404 and out["error"]["message"] == "The model `m` does not exist.", out
