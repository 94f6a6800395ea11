"""`--served-model-name`: the OpenAI routes answer to it and to the --model-path value,
/v1/models lists both (served name first), and any other name gets a 404. Several names
(vLLM's form): each is accepted, answers and the metrics' `model_name` label give the first."""

from __future__ import annotations

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def model_names_by_family(text: str) -> dict[str, set[str | None]]:
    """Each metric family's `model_name` values over its samples, parsed as Prometheus does
    (a family with no sample yet maps to an empty set)."""
    return {
        family.name: {sample.labels.get("model_name") for sample in family.samples}
        for family in text_string_to_metric_families(text)
    }


def assert_every_family_labelled(text: str, model: str, min_families: int) -> None:
    names = model_names_by_family(text)
    wrong = {family: seen for family, seen in names.items() if seen and seen != {model}}
    assert not wrong, wrong
    assert sum(1 for seen in names.values() if seen) >= min_families, names


@pytest.mark.parametrize("fixture", ["named_server", "tiny_server"])
def test_every_metric_family_carries_the_first_models_name(fixture, request):
    """vLLM's and SGLang's server metrics all carry `model_name` (the first served name, else
    the model path), and dashboards built for them select on it; pdserve's carried none. The
    label is the first name /v1/models lists: --served-model-name's, else --model-path's."""
    url = request.getfixturevalue(fixture).url
    model = http_json("GET", url + "/v1/models")[1]["data"][0]["id"]
    assert model == {"named_server": "my-llm", "tiny_server": "tiny-random"}[fixture]
    assert http_json("POST", url + "/generate", {"text": "hi", "sampling_params": {}})[0] == 200
    status, text = http_json("GET", url + "/metrics")
    assert status == 200
    assert_every_family_labelled(text, model, min_families=20)


def test_disaggregation_and_bootstrap_families_carry_model_name_too():
    """The families a prefill or decode server adds (DisaggMetrics, the bootstrap registry's
    collector), each given a sample in process: a PD pair would cost far more to start."""
    from pdserve.auth import ProofChecker
    from pdserve.disagg.bootstrap_registry import BootstrapRegistry
    from pdserve.disagg.metrics import DisaggMetrics
    from pdserve.serving.metrics import ServerMetrics
    from pdserve.serving.protocol import WorkerLoad

    server = ServerMetrics("prefill", "foo")
    disagg = DisaggMetrics(server)
    checker = ProofChecker("secret")
    checker.refuse("missing proof")
    disagg.watch_registry(BootstrapRegistry(room_ttl_s=60.0, dp_size=1), checker)
    server.observe_load(
        WorkerLoad(
            dp_rank=0, num_running=0, num_waiting=0, num_tokens=0, num_used_pages=0,
            num_free_pages=4, num_total_pages=4, cache_lookup_tokens=4, cache_hit_tokens=2,
        )
    )  # fmt: skip
    server.observe_finished("stop", 3, 2, 0, 0.5)
    server.ttft_s.observe(0.1)
    server.itl_s.observe(0.1)
    server.auth_refusals.labels("api_key").inc()
    server.kv_events_dropped.inc()
    disagg.conflict("follow_bootstrap_room conflict")
    disagg.query_round_trip(2)
    disagg.epoch_change()
    disagg.stages({"prefill_compute": 0.1})
    disagg.transfer(4096, 0.01, 16)
    disagg.rooms_forwarded.inc()
    disagg.relay_seconds.observe(0.01)
    text = server.render().decode()
    names = model_names_by_family(text)
    assert all(names.values()), [family for family, seen in names.items() if not seen]
    assert_every_family_labelled(text, "foo", min_families=len(names))
