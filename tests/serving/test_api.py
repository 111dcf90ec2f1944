"""The OpenAI-compatible API in process (FastAPI's TestClient, the real `openai` package over
it, the real decoding thread and models): each client's greedy answers are `fedamole generate`'s
(alone and streamed, chat and completions), keys keep organisations apart, and bad requests get
OpenAI-shaped 4xx errors without harming the server. tests/serving/test_server.py drives the
real uvicorn server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack

import openai
import pytest
from fastapi.testclient import TestClient
from serving_cases import KEYS, MAX_TOKENS, PROMPTS, chat, key_for

from fedamole.http_server import HTTPSettings
from fedamole.serving import load_client_model
from fedamole.serving.api import KeyFileError, KeyRing, create_app
from fedamole.serving.personalised import request_examples
from fedamole.serving.scheduler import BatchScheduler
from fedamole.serving.server import build_pool, check_settings
from fedamole.serving.settings import ServeSettings


@pytest.fixture(scope="module")
def apps(served, tmp_path_factory) -> Iterator[dict[str, TestClient]]:
    """FedAMoLE's clients behind API keys, FedIT's without, each with its decoding thread."""
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    with ExitStack() as stack:
        out = {}
        for method, key_file in (("fedamole", keys), ("fedit", None)):
            settings = ServeSettings(api_keys=key_file)
            pool = build_pool(settings, served[method], None, [], None)
            keyring = None if key_file is None else KeyRing.load(key_file, pool.names())
            scheduler = BatchScheduler(pool, settings)
            scheduler.start()
            stack.callback(scheduler.stop)
            app = create_app(pool, scheduler, keyring, settings)
            out[method] = stack.enter_context(TestClient(app))
        yield out


def _client(http: TestClient, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
    )


@pytest.mark.parametrize("method", ["fedamole", "fedit"])
def test_greedy_answers_are_generates_alone_and_streamed(method, apps, served, generated):
    keyed = method == "fedamole"
    clients = {
        c: _client(apps[method], key_for(f"client-{c}") if keyed else "none") for c in range(3)
    }
    assert len({generated[method, c, p] for c in range(3) for p in PROMPTS}) > 1  # can fail
    for c, api in clients.items():
        for prompt in PROMPTS[:2]:
            assert chat(api, f"client-{c}", prompt) == generated[method, c, prompt]
        chunks = api.chat.completions.create(
            model=f"client-{c}",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        assert streamed == generated[method, c, PROMPTS[0]]

    # /v1/completions takes text already in the prompt format: the client's own prompt text.
    model = load_client_model(served[method], 1)
    text = model.prompter.prompt(request_examples(PROMPTS[2])[0])
    completion = clients[1].completions.create(
        model="client-1", prompt=text, temperature=0, max_tokens=MAX_TOKENS
    )
    assert completion.choices[0].text == generated[method, 1, PROMPTS[2]]
    pieces = clients[1].completions.create(
        model="client-1", prompt=text, temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    assert "".join(piece.choices[0].text for piece in pieces) == generated[method, 1, PROMPTS[2]]


def test_keys_keep_each_organisation_to_its_own_models(apps):
    http = apps["fedamole"]
    for key, models in KEYS.items():
        assert [m.id for m in _client(http, key).models.list()] == models
    no_key = http.get("/v1/models")
    assert no_key.status_code == 401 and "API key" in no_key.json()["error"]["message"]
    no_key_bad_body = http.post("/v1/chat/completions", json={"model": "client-0"})
    assert no_key_bad_body.status_code == 401  # the key is checked before the body
    with pytest.raises(openai.AuthenticationError) as wrong:
        chat(_client(http, "sk-wrong-key-000"), "client-0", "hi")
    assert wrong.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as other:  # org one asks for org zero's model
        chat(_client(http, "sk-org-one-11111"), "client-0", "hi")
    assert "client-0" in other.value.body["message"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(apps, generated):
    http, key = apps["fedamole"], "sk-org-zero-0000"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    malformed = http.post("/v1/chat/completions", content="{not json", headers=headers)
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    missing_field = http.post("/v1/chat/completions", json={"model": "client-0"}, headers=headers)
    assert missing_field.status_code == 400 and missing_field.json()["error"]["param"] == "messages"

    api = _client(http, key)
    with pytest.raises(openai.NotFoundError):
        chat(api, "client-9", "hi")
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(api, "client-0", "word " * 2000)
    assert "maximum context length is 512" in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        api.chat.completions.create(
            model="client-0", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
        )
    assert too_many.value.body["param"] == "max_tokens"

    for body in (
        {"model": "client-0", "prompt": ""},  # nothing to continue
        {"model": "client-0", "prompt": "hi", "seed": 2**64},  # beyond torch's seeds
    ):
        answer = http.post("/v1/completions", json=body, headers=headers)
        assert answer.status_code == 400, (body, answer.text)
    surrogate = '{"model": "client-0", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    lone = http.post("/v1/chat/completions", content=surrogate, headers=headers)
    assert lone.status_code == 400, lone.text
    seeded = {"model": "client-0", "prompt": "hi", "seed": 2**63 + 5, "max_tokens": 2}
    assert http.post("/v1/completions", json=seeded, headers=headers).status_code == 200
    assert api.models.retrieve("client-0").id == "client-0"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("client-1")  # another organisation's

    assert chat(api, "client-0", PROMPTS[0]) == generated["fedamole", 0, PROMPTS[0]]


def test_health_tells_only_a_key_holder_how_many_models(apps):
    http = apps["fedamole"]
    assert http.get("/health").json() == {"status": "ok"}
    wrong = http.get("/health", headers={"Authorization": "Bearer sk-nobody-00"})
    assert wrong.json() == {"status": "ok"}
    one = http.get("/health", headers={"Authorization": "Bearer sk-org-one-11111"})
    assert one.json() == {"status": "ok", "models": 2}


def test_a_key_given_twice_is_refused_and_a_readable_key_file_warned(tmp_path, caplog):
    twice = tmp_path / "keys.yaml"
    twice.write_text(
        '"sk-org-zero-0000": [client-0]\n"sk-org-one-11111": [client-1]\n'
        '"sk-org-zero-0000": ["*"]\n'
    )
    with pytest.raises(KeyFileError, match="lines 1 and 3 give the same key") as err:
        KeyRing.read(twice)
    assert "sk-org-zero" not in str(err.value)
    as_json = tmp_path / "keys.json"
    as_json.write_text('{"sk-org-zero-0000": ["client-0"],\n "sk-org-zero-0000": ["*"]}')
    with pytest.raises(KeyFileError, match="lines 1 and 2"):
        KeyRing.read(as_json)

    keys = tmp_path / "ok.json"
    keys.write_text(json.dumps(KEYS))
    for mode, warned in ((0o644, True), (0o600, False)):
        keys.chmod(mode)
        caplog.clear()
        check_settings(ServeSettings(HTTPSettings("127.0.0.1", 0), api_keys=keys))
        assert ("can be read by other users" in caplog.text) == warned
