"""One organisation's huge request against another's normal ones, on `fedamole serve`.

Trains a tiny-model FedAMoLE run (seconds), serves it with keys for two organisations and a
12 MB body limit, and times organisation zero's chat requests (greedy, 8 tokens) alone and
while organisation one's 10 MiB chat body is in flight (sent just before each of them). Prints
the latencies, the huge request's status, and the server's peak RSS.

    python benchmarks/serve_isolation.py [--requests 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

TINY = [
    "model.name=tiny-random-llama",
    "model.device=cpu",
    "model.max_length=512",
    "data.synthetic_per_task=10",
    "data.min_client_size=8",
    "federation.num_clients=2",
    "federation.rounds=1",
    "federation.local_steps=2",
    "hmole.num_experts=4",
    "eval.max_new_tokens=3",
]
KEYS = {"sk-org-zero-0000": ["client-0"], "sk-org-one-11111": ["client-1"]}
HUGE_BYTES = 10 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(run: Path, keys: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedamole.cli", "serve", "--run", str(run)]
    command += ["--api-keys", str(keys), "--port", str(port), "--max-body-bytes", "12000000"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start in 300 s")
        time.sleep(0.3)


def chat(url: str, key: str, model: str, content: str, max_tokens: int = 8) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    body |= {"max_tokens": max_tokens, "temperature": 0}
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )


def timed_normal(url: str) -> float:
    started = time.perf_counter()
    chat(url, "sk-org-zero-0000", "client-0", "Name a colour.").raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        sets = [arg for item in [*TINY, f"output.dir={run}"] for arg in ("--set", item)]
        subprocess.run([sys.executable, "-m", "fedamole.cli", "run", *sets], check=True)
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps(KEYS))
        keys.chmod(0o600)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = serve(run, keys, port)
        try:
            timed_normal(url)  # warm-up
            alone = [timed_normal(url) for _ in range(args.requests)]
            beside, statuses = [], []
            for _ in range(args.requests):
                huge = threading.Thread(
                    target=lambda: statuses.append(
                        chat(url, "sk-org-one-11111", "client-1", "x" * HUGE_BYTES).status_code
                    )
                )
                huge.start()
                time.sleep(0.05)  # its body is on the way
                beside.append(timed_normal(url))
                huge.join()
            rss = next(
                int(line.split()[1]) / 1024
                for line in Path(f"/proc/{server.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")
            )
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"tiny-random-llama, {args.requests} requests each"
    )
    print("\n| organisation zero's request | median s | max s |")
    print("|---|---|---|")
    print(f"| alone | {statistics.median(alone):.3f} | {max(alone):.3f} |")
    print(
        f"| with a 10 MiB request of organisation one in flight | "
        f"{statistics.median(beside):.3f} | {max(beside):.3f} |"
    )
    print(f"\nthe 10 MiB requests got: {sorted(set(statuses))}")
    print(f"server peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
