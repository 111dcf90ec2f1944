"""`fedamole serve` as a real process on loopback, queried with the real `openai` package: each
client's greedy answers are `fedamole generate`'s (alone, streamed, or in a mixed batch of 16),
keys keep organisations apart, and bad requests get OpenAI-shaped 4xx errors without harming the
server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_run import TINY_RUN

from fedamole.config import load_config
from fedamole.reporting import ADAPTER_WEIGHTS, RunDir
from fedamole.serving import export_client, load_client_model
from fedamole.serving.decoding import DecodeRow, Sampling
from fedamole.serving.personalised import request_examples
from fedamole.serving.pool import ExportPool, RunPool
from fedamole.serving.scheduler import BatchScheduler, Pending, QueueFull
from fedamole.transports.in_process import run_in_process

TINY = [*TINY_RUN, "model.device=cpu", "optim.lr=0.05", "federation.num_clients=3"]
PROMPTS = ["What is 12 plus 30?", "Name a colour.", "Sort: pear apple fig", "Say hello"]
MAX_TOKENS = 6
KEYS = {"sk-org-zero-0000": ["client-0"], "sk-org-one-11111": ["client-1", "client-2"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for method in ("fedamole", "fedit"):
        out[method] = root / method
        run_in_process(load_config(None, [*TINY, f"output.dir={out[method]}"]), method=method)
        for client in range(3):
            _make_distinct(RunDir(out[method]).client_folder(client) / ADAPTER_WEIGHTS, client)
    return out


def _make_distinct(weights: Path, seed: int) -> None:
    """Two tiny training steps leave the clients' models alike; random saved weights make each
    client answer differently, so an answer from the wrong client's adapter is caught."""
    gen = torch.Generator().manual_seed(seed)
    state = load_file(str(weights))
    save_file(
        {k: v + torch.randn(v.shape, generator=gen) * 0.5 for k, v in state.items()}, str(weights)
    )


def _serve(args: list[str], log: Path) -> Iterator[str]:
    port = _free_port()
    command = [sys.executable, "-m", "fedamole.cli", "serve", "--port", str(port), *args]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def fedamole_server(runs, tmp_path_factory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    log = keys.parent / "serve.log"
    yield from _serve(["--run", str(runs["fedamole"]), "--api-keys", str(keys)], log)


@pytest.fixture(scope="module")
def fedit_server(runs, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("fedit") / "serve.log"
    yield from _serve(["--run", str(runs["fedit"]), "--max-new-tokens", "32"], log)


@pytest.fixture(scope="module")
def generated(runs) -> dict[tuple[str, int, str], str]:
    """`fedamole generate`'s greedy answer per method, client and prompt (one prompt at a time)."""
    out = {}
    for method, run in runs.items():
        for client in range(3):
            model = load_client_model(run, client)
            for prompt in PROMPTS:
                out[method, client, prompt] = model.generate(prompt, max_new_tokens=MAX_TOKENS)[0]
    return out


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, model: str, prompt: str) -> str:
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert answer.usage.completion_tokens <= MAX_TOKENS
    return answer.choices[0].message.content


def _key_for(model: str) -> str:
    return next(key for key, models in KEYS.items() if model in models)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["fedamole", "fedit"])
def test_greedy_answers_are_generates_alone_streamed_and_16_at_once(
    method, runs, generated, request
):
    url = request.getfixturevalue(f"{method}_server")
    keyed = method == "fedamole"
    clients = {c: _client(url, _key_for(f"client-{c}") if keyed else "none") for c in range(3)}
    assert len({generated[method, c, p] for c in range(3) for p in PROMPTS}) > 1  # can fail
    for c, api in clients.items():
        for prompt in PROMPTS[:2]:
            assert _chat(api, f"client-{c}", prompt) == generated[method, c, prompt]
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
    model = load_client_model(runs[method], 1)
    text = model.prompter.prompt(request_examples(PROMPTS[2])[0])
    completion = clients[1].completions.create(
        model="client-1", prompt=text, temperature=0, max_tokens=MAX_TOKENS
    )
    assert completion.choices[0].text == generated[method, 1, PROMPTS[2]]
    pieces = clients[1].completions.create(
        model="client-1", prompt=text, temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    assert "".join(piece.choices[0].text for piece in pieces) == generated[method, 1, PROMPTS[2]]

    jobs = [(i % 3, PROMPTS[i % len(PROMPTS)]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(lambda job: _chat(clients[job[0]], f"client-{job[0]}", job[1]), jobs)
        )
    assert answers == [generated[method, c, p] for c, p in jobs]


@pytest.mark.e2e
def test_keys_keep_each_organisation_to_its_own_models(fedamole_server):
    url = fedamole_server
    for key, models in KEYS.items():
        assert [m.id for m in _client(url, key).models.list()] == models
    no_key = httpx.get(f"{url}/v1/models")
    assert no_key.status_code == 401 and "API key" in no_key.json()["error"]["message"]
    no_key_bad_body = httpx.post(f"{url}/v1/chat/completions", json={"model": "client-0"})
    assert no_key_bad_body.status_code == 401  # the key is checked before the body
    with pytest.raises(openai.AuthenticationError) as wrong:
        _chat(_client(url, "sk-wrong-key-000"), "client-0", "hi")
    assert wrong.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as other:  # org one asks for org zero's model
        _chat(_client(url, "sk-org-one-11111"), "client-0", "hi")
    assert "client-0" in other.value.body["message"]


@pytest.mark.e2e
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(fedamole_server, generated):
    url, key = fedamole_server, "sk-org-zero-0000"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    malformed = httpx.post(f"{url}/v1/chat/completions", content="{not json", headers=headers)
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    missing_field = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "client-0"}, headers=headers
    )
    assert missing_field.status_code == 400 and missing_field.json()["error"]["param"] == "messages"

    api = _client(url, key)
    with pytest.raises(openai.NotFoundError):
        _chat(api, "client-9", "hi")
    with pytest.raises(openai.BadRequestError) as too_long:
        _chat(api, "client-0", "word " * 2000)
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
        answer = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert answer.status_code == 400, (body, answer.text)
    surrogate = '{"model": "client-0", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    lone = httpx.post(f"{url}/v1/chat/completions", content=surrogate, headers=headers)
    assert lone.status_code == 400, lone.text
    seeded = {"model": "client-0", "prompt": "hi", "seed": 2**63 + 5, "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=seeded, headers=headers).status_code == 200
    assert api.models.retrieve("client-0").id == "client-0"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("client-1")  # another organisation's

    assert _chat(api, "client-0", PROMPTS[0]) == generated["fedamole", 0, PROMPTS[0]]


def test_an_open_server_must_stay_on_loopback(runs):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedamole.cli",
            "serve",
            "--run",
            str(runs["fedit"]),
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--api-keys" in result.stdout + result.stderr


@pytest.mark.parametrize("method", ["fedamole", "fedit"])
def test_rows_that_join_a_running_batch_decode_as_if_alone(method, runs, generated):
    """Continuous batching: rows admitted while others are mid-decode, for mixed clients, give
    `fedamole generate`'s greedy answers; a seeded sampled row gives the same sample whatever
    else shares its batch."""
    pool = RunPool(runs[method])
    prompter = pool.prompter("client-0")
    jobs = [(i % 3, PROMPTS[i % len(PROMPTS)]) for i in range(7)]
    rows = [
        DecodeRow(f"client-{c}", prompter.chat_ids([{"role": "user", "content": p}]), MAX_TOKENS)
        for c, p in jobs
    ]
    answers: dict[int, object] = {}
    batch = pool.continuous_batch()
    for step, (start, stop) in enumerate([(0, 2), (2, 5), (5, 7)]):
        batch.admit([(rows[i], partial(answers.__setitem__, i)) for i in range(start, stop)])
        for _ in range(step + 1):
            batch.step()
    while batch.active:
        batch.step()
    assert [answers[i].text for i in range(7)] == [generated[method, c, p] for c, p in jobs]

    def sampled(company: int) -> str:
        seeded = DecodeRow(
            "client-1", rows[1].prompt_ids, MAX_TOKENS, Sampling(temperature=1.0, seed=7)
        )
        out: dict[int, object] = {}
        batch.admit([(seeded, partial(out.__setitem__, 0))])
        batch.admit([(rows[i], partial(out.__setitem__, 1 + i)) for i in range(company)])
        while batch.active:
            batch.step()
        return out[0].text

    assert sampled(0) == sampled(4)


def test_one_client_at_a_time_methods_and_exports_answer_as_generate(runs, tmp_path):
    """FedDPA (its per-prompt mix) is served one client at a time on the shared backbone, an
    exported folder as its own model: both answer as `fedamole generate`."""
    feddpa = tmp_path / "feddpa"
    run_in_process(load_config(None, [*TINY, f"output.dir={feddpa}"]), method="feddpa")
    pool = RunPool(feddpa)
    assert pool.continuous_batch() is None and pool.needs_instruction("client-0")
    rows = [
        DecodeRow(f"client-{i % 3}", [], MAX_TOKENS, example=request_examples(p)[0])
        for i, p in enumerate(PROMPTS)
    ]
    for row in rows:
        row.prompt_ids = pool.prompter(row.model).prompt_ids(row.example)
    expected = [
        load_client_model(feddpa, i % 3).generate(p, max_new_tokens=MAX_TOKENS)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert [a.text for a in pool.answer(rows)] == expected

    folder = export_client(runs["fedit"], 2, tmp_path / "fedit-client-2").folder
    exported = ExportPool([folder])
    row = DecodeRow(
        "fedit-client-2",
        exported.prompter("fedit-client-2").chat_ids([{"role": "user", "content": PROMPTS[0]}]),
        MAX_TOKENS,
    )
    assert (
        exported.answer([row])[0].text
        == load_client_model(runs["fedit"], 2).generate(PROMPTS[0], max_new_tokens=MAX_TOKENS)[0]
    )


def test_a_full_queue_refuses_at_once(runs):
    """Requests beyond --max-queue are refused (the API's 429) instead of waiting unboundedly."""
    scheduler = BatchScheduler(RunPool(runs["fedit"], [0]), max_batch=1, max_queue=2)  # not started
    row = DecodeRow("client-0", [1, 2, 3], MAX_TOKENS)
    for _ in range(2):
        scheduler.submit(Pending(row, lambda _result: None))
    with pytest.raises(QueueFull):
        scheduler.submit(Pending(row, lambda _result: None))


def test_a_row_whose_client_went_away_stops_at_its_next_token(runs):
    pool = RunPool(runs["fedamole"], [0, 1])
    prompt = pool.prompter("client-0").chat_ids([{"role": "user", "content": PROMPTS[0]}])
    stays, leaves = DecodeRow("client-0", prompt, 20), DecodeRow("client-1", prompt, 20)
    out: dict[str, object] = {}
    batch = pool.continuous_batch()
    batch.admit(
        [(stays, partial(out.__setitem__, "stays")), (leaves, partial(out.__setitem__, "leaves"))]
    )
    batch.step()
    leaves.cancelled = True  # what the API does when the HTTP request is gone
    batch.step()
    assert "leaves" in out and batch.active == 1
    while batch.active:
        batch.step()
    assert out["leaves"].completion_tokens < out["stays"].completion_tokens


# ------------------------------------------------------------------ one organisation vs the rest
@pytest.fixture(scope="module")
def guarded_server(runs, tmp_path_factory) -> Iterator[str]:
    """Keys, a body limit of 12 MB and 1 s header and idle timeouts."""
    keys = tmp_path_factory.mktemp("guarded") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    keys.chmod(0o600)
    limits = ["--max-body-bytes", "12000000", "--header-timeout", "1", "--idle-timeout", "1"]
    yield from _serve(
        ["--run", str(runs["fedamole"]), "--api-keys", str(keys), *limits],
        keys.parent / "serve.log",
    )


@pytest.mark.e2e
def test_one_huge_request_does_not_hold_up_another_organisation(guarded_server, generated):
    """A 10 MiB chat body (under the limit) from organisation one while organisation zero asks
    normal questions: theirs are answered as alone, and the huge one is refused by its length
    without being tokenised (benchmarks/serve.py times the other organisation's requests)."""
    url = guarded_server
    huge = {"model": "client-1", "messages": [{"role": "user", "content": "x" * (10 << 20)}]}
    headers = {"Authorization": "Bearer sk-org-one-11111"}

    def send_huge() -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=huge, headers=headers, timeout=120)

    api = _client(url, "sk-org-zero-0000")
    with ThreadPoolExecutor(1) as pool:
        refused = pool.submit(send_huge)
        answers = [_chat(api, "client-0", prompt) for prompt in PROMPTS[:3]]
        assert refused.result().status_code == 400
    message = refused.result().json()["error"]["message"]
    assert "maximum context length" in message and "characters" in message  # never tokenised
    assert answers == [generated["fedamole", 0, p] for p in PROMPTS[:3]]


def _raw(url: str, data: bytes, timeout: float = 30) -> bytes:
    """What the server answers on one TCP connection to ``data`` (b"" if it just closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.e2e
def test_a_body_over_the_limit_is_refused_before_it_is_sent(guarded_server):
    """Only the headers go out: a declared 20 MB body is answered 413 without being read."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-org-zero-0000"
        b"\r\nContent-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
    )
    answer = _raw(guarded_server, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-body-bytes" in answer
    big = httpx.post(
        f"{guarded_server}/v1/chat/completions",
        content=b"{" + b" " * 12_000_001 + b"}",
        headers={"Authorization": "Bearer sk-org-zero-0000", "Content-Type": "application/json"},
        timeout=60,
    )
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["error"]["message"]


@pytest.mark.e2e
def test_silent_and_trickling_connections_are_closed(guarded_server):
    assert _raw(guarded_server, b"") == b""  # sends nothing: closed after the header timeout
    host, port = guarded_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(40):  # one header byte every 0.1 s never completes the headers
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                closed = sock.recv(1) == b""
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if closed:
                break
        assert closed
    assert httpx.get(f"{guarded_server}/health").status_code == 200  # and the server goes on


@pytest.mark.e2e
def test_health_tells_only_a_key_holder_how_many_models(guarded_server):
    assert httpx.get(f"{guarded_server}/health").json() == {"status": "ok"}
    wrong = httpx.get(f"{guarded_server}/health", headers={"Authorization": "Bearer sk-nobody-00"})
    assert wrong.json() == {"status": "ok"}
    one = httpx.get(
        f"{guarded_server}/health", headers={"Authorization": "Bearer sk-org-one-11111"}
    )
    assert one.json() == {"status": "ok", "models": 2}


def test_a_key_given_twice_is_refused_and_a_readable_key_file_warned(tmp_path, caplog):
    from fedamole.serving.api import KeyFileError, KeyRing
    from fedamole.serving.server import ServerSettings, check_settings

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
        check_settings(ServerSettings(port=0, api_keys=keys))
        assert ("can be read by other users" in caplog.text) == warned
