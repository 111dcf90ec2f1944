"""Throughput and latency of `fedamole serve`: the real server process, driven over HTTP by the
`openai` client, with 1, 4 and 16 concurrent requests spread over 4 clients of a FedAMoLE run,
against the same requests answered one at a time; also peak memory serving 4 clients vs 1.

    python benchmarks/serve.py                      # trains a short 4-client run first (~2 min)
    python benchmarks/serve.py --run runs/default   # any finished run with >= 4 clients

It prints the machine, the settings, a table and the ratios, and checks that every batched
greedy answer equals the one-at-a-time answer to the same request.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK_RUN = [
    "federation.num_clients=4",
    "federation.rounds=1",
    "federation.local_steps=2",
    "data.val_cap=2",
    "data.test_cap=2",
    "eval.max_new_tokens=4",
    "eval.base_model=false",
]
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "List four colours of the rainbow.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Describe a cat in one sentence.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quick_run(out: Path) -> Path:
    if not (out / "summary.json").is_file():
        sets = [arg for item in QUICK_RUN for arg in ("--set", item)]
        command = [
            "fedamole",
            "run",
            "--config",
            str(ROOT / "configs/default.yaml"),
            "--out",
            str(out),
            *sets,
        ]
        subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], check=True)
    return out


class Server:
    """`fedamole serve` in its own process, on a free loopback port."""

    def __init__(self, run: Path, clients: list[int], max_batch: int) -> None:
        self.port = free_port()
        client_args = [arg for c in clients for arg in ("--client", str(c))]
        command = [
            sys.executable,
            "-m",
            "fedamole.cli",
            "serve",
            "--run",
            str(run),
            *client_args,
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 300 s")
            time.sleep(0.5)
        self.api = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=600
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def ask(
    api: openai.OpenAI, model: str, instruction: str, max_tokens: int
) -> tuple[str, int, float]:
    started = time.perf_counter()
    answer = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": instruction}],
        temperature=0,
        max_tokens=max_tokens,
    )
    return (
        answer.choices[0].message.content,
        answer.usage.completion_tokens,
        time.perf_counter() - started,
    )


def drive(server: Server, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: ask(server.api, *job, max_tokens), jobs))
    wall = time.perf_counter() - started
    latencies = sorted(r[2] for r in results)
    return {
        "answers": [r[0] for r in results],
        "tokens": sum(r[1] for r in results),
        "wall": wall,
        "throughput": sum(r[1] for r in results) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, help="a finished run with >= 4 clients (default: train one)"
    )
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    run = args.run or quick_run(ROOT / "runs/bench-serve")
    clients = [0, 1, 2, 3]
    jobs = [
        (f"client-{clients[i % 4]}", INSTRUCTIONS[i % len(INSTRUCTIONS)])
        for i in range(args.requests)
    ]

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"run {run}; {args.requests} chat requests over {len(clients)} clients, greedy, "
        f"max_tokens={args.max_tokens}, --max-batch 16"
    )
    server = Server(run, clients, max_batch=16)
    try:
        drive(server, jobs[:4], 4, 4)  # warm-up
        baseline = drive(server, jobs, 1, args.max_tokens)  # one at a time
        rows = {c: drive(server, jobs, c, args.max_tokens) for c in (1, 4, 16)}
        peak_four = server.peak_rss_mib()
    finally:
        server.close()
    single = Server(run, [0], max_batch=16)
    try:
        one_client = [("client-0", instruction) for _, instruction in jobs]
        drive(single, one_client[:4], 4, 4)
        drive(single, one_client, 16, args.max_tokens)
        peak_one = single.peak_rss_mib()
    finally:
        single.close()

    print(
        "\n| concurrent requests | tokens | wall s | tokens/s | p50 latency s | p99 latency s | vs one at a time |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| one at a time | {baseline['tokens']} | {baseline['wall']:.2f} | {baseline['throughput']:.1f} | "
        f"{baseline['p50']:.2f} | {baseline['p99']:.2f} | 1.00x |"
    )
    for c, r in rows.items():
        print(
            f"| {c} | {r['tokens']} | {r['wall']:.2f} | {r['throughput']:.1f} | {r['p50']:.2f} | "
            f"{r['p99']:.2f} | {r['throughput'] / baseline['throughput']:.2f}x |"
        )
    same = all(r["answers"] == baseline["answers"] for r in rows.values())
    print(f"\nbatched greedy answers identical to one-at-a-time: {same}")
    print(
        f"peak RSS: 4 clients {peak_four:.0f} MiB, 1 client {peak_one:.0f} MiB, "
        f"ratio {peak_four / peak_one:.2f}x"
    )
    ratio = rows[16]["throughput"] / baseline["throughput"]
    print(f"throughput at 16 concurrent / one at a time: {ratio:.2f}x (target >= 3x)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
