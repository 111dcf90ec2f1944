"""`fedamole serve`: the real uvicorn server in its own process (one test, queried with the real
`openai` package and raw sockets: 16 mixed requests at once, body limits, slow connections, one
organisation's huge request beside another's), the loopback rule, and `--max-loaded`: four
clients served with at most two resident, each answering as `fedamole generate`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from serving_cases import CLIENTS, KEYS, PROMPTS, chat, key_for
from typer.testing import CliRunner

from fedamole.cli import app
from fedamole.serving.api import create_app
from fedamole.serving.scheduler import BatchScheduler
from fedamole.serving.server import build_pool
from fedamole.serving.settings import ServeSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def guarded_server(served, tmp_path) -> Iterator[str]:
    """FedAMoLE's clients with keys, a body limit of 12 MB and a 1 s header timeout."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    keys.chmod(0o600)
    limits = ["--max-body-bytes", "12000000", "--header-timeout", "1"]
    yield from _serve(
        ["--run", str(served["fedamole"]), "--api-keys", str(keys), *limits], tmp_path / "log"
    )


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _raw(url: str, data: bytes, timeout: float = 30) -> bytes:
    """What the server answers on one TCP connection to ``data`` (b"" if it just closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def _mixed_requests_at_once(url: str, generated: dict) -> None:
    """16 requests for three clients at once: each client's greedy answer, as if alone."""
    clients = {c: _client(url, key_for(f"client-{c}")) for c in range(3)}
    jobs = [(i % 3, PROMPTS[i % len(PROMPTS)]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(lambda job: chat(clients[job[0]], f"client-{job[0]}", job[1]), jobs)
        )
    assert answers == [generated["fedamole", c, p] for c, p in jobs]


def _huge_request_beside_another_organisation(url: str, generated: dict) -> None:
    """A 10 MiB chat body (under the limit) from organisation one while organisation zero asks
    normal questions: theirs are answered as alone, and the huge one is refused by its length
    without being tokenised (benchmarks/serve.py times the other organisation's requests)."""
    huge = {"model": "client-1", "messages": [{"role": "user", "content": "x" * (10 << 20)}]}
    headers = {"Authorization": "Bearer sk-org-one-11111"}

    def send_huge() -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=huge, headers=headers, timeout=120)

    api = _client(url, "sk-org-zero-0000")
    with ThreadPoolExecutor(1) as pool:
        refused = pool.submit(send_huge)
        answers = [chat(api, "client-0", prompt) for prompt in PROMPTS[:3]]
        assert refused.result().status_code == 400
    message = refused.result().json()["error"]["message"]
    assert "maximum context length" in message and "characters" in message  # never tokenised
    assert answers == [generated["fedamole", 0, p] for p in PROMPTS[:3]]


def _a_body_over_the_limit_is_refused_before_it_is_sent(url: str) -> None:
    """Only the headers go out: a declared 20 MB body is answered 413 without being read."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-org-zero-0000"
        b"\r\nContent-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
    )
    answer = _raw(url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-body-bytes" in answer
    big = httpx.post(
        f"{url}/v1/chat/completions",
        content=b"{" + b" " * 12_000_001 + b"}",
        headers={"Authorization": "Bearer sk-org-zero-0000", "Content-Type": "application/json"},
        timeout=60,
    )
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["error"]["message"]


def _silent_and_trickling_connections_are_closed(url: str) -> None:
    assert _raw(url, b"") == b""  # sends nothing: closed after the header timeout
    host, port = url.removeprefix("http://").split(":")
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
    assert httpx.get(f"{url}/health").status_code == 200  # and the server goes on


@pytest.mark.e2e
def test_the_real_server_answers_as_generate_and_holds_off_what_would_hold_it(
    guarded_server, generated
):
    _mixed_requests_at_once(guarded_server, generated)
    _huge_request_beside_another_organisation(guarded_server, generated)
    _a_body_over_the_limit_is_refused_before_it_is_sent(guarded_server)
    _silent_and_trickling_connections_are_closed(guarded_server)


def test_an_open_server_must_stay_on_loopback(runs):
    result = CliRunner().invoke(app, ["serve", "--run", str(runs["fedit"]), "--host", "0.0.0.0"])
    assert result.exit_code != 0
    assert "--api-keys" in result.output


@pytest.mark.parametrize("method", ["fedamole", "fedit"])
def test_max_loaded_2_serves_4_clients_as_generate_with_at_most_2_resident(
    method, served, generated
):
    """`fedamole serve --max-loaded 2` over four clients: 16 requests at once for all four, each
    answered with `fedamole generate`'s greedy text, and never more than two clients' adapters
    on the device (the rest read again from the run when asked for)."""
    settings = ServeSettings(max_loaded=2)
    pool = build_pool(settings, served[method], None, [], None)
    scheduler = BatchScheduler(pool, settings)
    scheduler.start()
    jobs = [(i % CLIENTS, PROMPTS[i // CLIENTS]) for i in range(16)]
    try:
        with TestClient(create_app(pool, scheduler, None, settings)) as http:
            api = openai.OpenAI(
                base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0
            )
            with ThreadPoolExecutor(16) as threads:
                answers = list(threads.map(lambda job: chat(api, f"client-{job[0]}", job[1]), jobs))
    finally:
        scheduler.stop()
    assert answers == [generated[method, c, p] for c, p in jobs]
    assert len(pool.resident.loaded) == 2
    assert _kept_on_device(pool, method) == set(pool.resident.loaded)


def _kept_on_device(pool, method: str) -> set[str]:
    """The clients whose adapter copies the model holds: HMoLE's kept expert sets (one per
    module), or PEFT's adapters beside the handle's own."""
    if method == "fedamole":
        return set(next(iter(pool.handle.layers.values())).kept)
    return set(pool.handle.model.peft_config) - {"default"}
