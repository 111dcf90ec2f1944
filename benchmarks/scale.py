"""How fedamole's costs grow with the number of clients, in process, on the tiny random Llama.

A FedAMoLE federation of 10, 100 and 1,000 clients, 20 sampled per round
(``federation.clients_per_round``), 20 experts per module, 8 JSONL examples per client
(iid), each size in a fresh process so peak RSS is its own. Per round it splits the wall time
into client work (the transport's train and evaluate calls) and server work (everything else:
payloads, aggregation, RSEA, records, checkpoint), times the checkpoint write, and measures how
much the run directory grew: the round's own files (records, example scores, assignments) apart
from the checkpoint, which holds every client's latest RSEA embeddings and so grows by the
clients seen for the first time (none once all have been seen).
It also times one whole RSEA round (scores from the embeddings, then the exact assignment) of
1,000 clients x 300 experts in 60 modules. Printed: the table with each figure's ratio to the 10-client
run. Targets: at 1,000 clients, server work per round <= 2x the 10-client figure plus RSEA's
time, and run-dir growth per round independent of the total number of clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SIZES = (10, 100, 1000)
PER_ROUND = 20


def _settings(clients: int, rounds: int, data: Path, out: Path) -> list[str]:
    return [
        "model.name=tiny-random-llama",
        "model.max_length=512",
        "data.source=jsonl",
        f"data.path={data}",
        "data.partition=iid",
        "data.min_client_size=8",
        f"federation.num_clients={clients}",
        f"federation.clients_per_round={min(PER_ROUND, clients)}",
        f"federation.rounds={rounds}",
        "federation.local_steps=1",
        "federation.batch_size=2",
        "hmole.num_experts=20",
        "eval.max_new_tokens=2",
        "eval.batch_size=16",
        f"output.dir={out}",
    ]


def _write_examples(path: Path, count: int) -> None:
    """Distinct short additions, 8 per client: enough for 1,000 clients, cheap to train on."""
    with path.open("w") as file:
        for i in range(count):
            a, b = divmod(i, 97)
            row = {"instruction": "Add.", "input": f"{a} + {b}", "output": str(a + b)}
            file.write(json.dumps(row) + "\n")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass
class Timer:
    """Wraps the transport's client calls (their time; at each round's start, after the previous
    round's records and checkpoint, the run dir's size) and the checkpoint write (its time)."""

    run_dir: Path
    client_s: dict[int, float] = field(default_factory=dict)
    checkpoint_s: list[float] = field(default_factory=list)
    starts: dict[int, float] = field(default_factory=dict)
    dir_bytes: dict[int, int] = field(default_factory=dict)
    checkpoint_bytes: dict[int, int] = field(default_factory=dict)

    def wrap(self, transport_cls: type, run_dir_cls: type) -> None:
        timer = self

        def timed_client(name: str):
            inner = getattr(transport_cls, name)

            def call(self, round_idx, payloads):
                if name == "train":
                    timer._round_starts(round_idx)
                began = time.perf_counter()
                result = inner(self, round_idx, payloads)
                spent = time.perf_counter() - began
                timer.client_s[round_idx] = timer.client_s.get(round_idx, 0.0) + spent
                return result

            setattr(transport_cls, name, call)

        save = run_dir_cls.save_checkpoint

        def save_checkpoint(self, checkpoint):
            began = time.perf_counter()
            save(self, checkpoint)
            timer.checkpoint_s.append(time.perf_counter() - began)

        timed_client("train")
        timed_client("evaluate")
        run_dir_cls.save_checkpoint = save_checkpoint

    def _round_starts(self, round_idx: int) -> None:
        self.starts[round_idx] = time.perf_counter()
        self.dir_bytes[round_idx] = _dir_bytes(self.run_dir)
        checkpoint = self.run_dir / "checkpoint.safetensors"
        self.checkpoint_bytes[round_idx] = checkpoint.stat().st_size if checkpoint.exists() else 0


def one_size(clients: int, rounds: int, work: Path) -> dict[str, float]:
    """Run one federation in this process and return its per-round figures (rounds 1.. only:
    round 0 pays for first-touch allocations)."""
    from rich.console import Console

    from fedamole import reporting
    from fedamole.config import load_config
    from fedamole.transports import in_process

    data, out = work / "examples.jsonl", work / "run"
    _write_examples(data, 8 * clients)
    timer = Timer(out)
    timer.wrap(in_process.InProcessTransport, reporting.RunDir)
    cfg = load_config(None, _settings(clients, rounds, data, out))
    began = time.perf_counter()
    in_process.run_in_process(cfg, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
    total = time.perf_counter() - began
    steady = range(1, rounds - 1)  # the last round also writes client models and plots
    round_s = [timer.starts[r + 1] - timer.starts[r] for r in steady]
    client_s = [timer.client_s[r] for r in steady]
    growth = [timer.dir_bytes[r + 1] - timer.dir_bytes[r] for r in steady]
    checkpoint = [timer.checkpoint_bytes[r + 1] - timer.checkpoint_bytes[r] for r in steady]
    return {
        "clients": clients,
        "round_s": statistics.median(round_s),
        "client_s": statistics.median(client_s),
        "server_s": statistics.median(r - c for r, c in zip(round_s, client_s, strict=True)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "run_dir_bytes": _dir_bytes(out),
        "round_files_bytes_per_round": statistics.median(
            g - c for g, c in zip(growth, checkpoint, strict=True)
        ),
        "checkpoint_growth_bytes_per_round": statistics.median(checkpoint),
        "checkpoint_s": statistics.median(timer.checkpoint_s[r] for r in steady),
        "total_s": total,
    }


def rsea_seconds(repeats: int) -> float:
    """Median wall time of one whole RSEA round (expert preferences from the embeddings, then
    the exact assignment) of 1,000 clients x 300 experts in 60 modules, r = 8, k_c = 10,
    k_min = 2, M = 8: each client reports its data embedding and 3 experts' per module."""
    import numpy as np
    import torch

    from fedamole.config import load_config
    from fedamole.methods.fedamole import rsea_architectures
    from fedamole.types import ClientEmbeddings

    clients, experts, rank = 1000, 300, 8
    cfg = load_config(
        None,
        [f"federation.num_clients={clients}", f"hmole.num_experts={experts}"]
        + [f"hmole.rank={rank}", "rsea.clients_per_expert=10", "rsea.min_experts=2"]
        + ["rsea.max_experts=8"],
    )
    modules = [f"layers.{i}.{p}_proj" for i in range(30) for p in ("q", "v")]
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    embeddings = {
        c: ClientEmbeddings(
            data={m: torch.randn(rank, generator=gen) for m in modules},
            experts={
                m: {
                    int(e): torch.randn(rank, generator=gen)
                    for e in rng.choice(experts, 3, replace=False)
                }
                for m in modules
            },
        )
        for c in range(clients)
    }
    walls = []
    for _ in range(repeats):
        began = time.perf_counter()
        rsea_architectures(cfg, modules, list(range(clients)), embeddings, rank, {})
        walls.append(time.perf_counter() - began)
    return statistics.median(walls)


def _child(clients: int, rounds: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", str(clients), "--rounds", str(rounds)]
    cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{clients} clients failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(value: float, base: float, key: str) -> str:
    """To the 10-client run; none for checkpoint growth, ~0 there (all 10 seen in round 0)."""
    return "-" if key == "checkpoint_growth_bytes_per_round" else f"{value / base:.2f}x"


def _table(rows: list[dict[str, float]], rsea_s: float) -> str:
    base = rows[0]
    columns = [
        ("round_s", "round s"),
        ("client_s", "client s"),
        ("server_s", "server s"),
        ("peak_rss_mib", "peak RSS MiB"),
        ("checkpoint_s", "checkpoint s"),
        ("run_dir_bytes", "run dir KB"),
        ("round_files_bytes_per_round", "round files KB/round"),
        ("checkpoint_growth_bytes_per_round", "checkpoint KB/round"),
    ]
    kilo = ("run_dir_bytes", "round_files_bytes_per_round", "checkpoint_growth_bytes_per_round")
    scale = dict.fromkeys(kilo, 1e-3)
    lines = ["clients | " + " | ".join(f"{title} (x10-client)" for _, title in columns)]
    for row in rows:
        cells = [
            f"{row[key] * scale.get(key, 1):.3f} ({_ratio(row[key], base[key], key)})"
            for key, _ in columns
        ]
        lines.append(f"{row['clients']:>7} | " + " | ".join(cells))
    last = rows[-1]
    bound = 2 * base["server_s"] + rsea_s
    lines.append(
        f"RSEA round, 1000 clients x 300 experts, 60 modules: {rsea_s:.2f} s; target: 1,000-client "
        f"server s/round {last['server_s']:.3f} <= 2 x {base['server_s']:.3f} + RSEA = {bound:.2f} "
        f"[{'OK' if last['server_s'] <= bound else 'MISSED'}]"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="per size; rounds 1..R-2 measured")
    parser.add_argument("--rsea-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (round 0 and the last round are not measured)")
    if args.one is not None:
        import torch

        torch.set_num_threads(args.threads)  # steadier timings on a shared machine
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(one_size(args.one, args.rounds, Path(work))))
        return 0
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"settings: FedAMoLE, tiny-random-llama, {PER_ROUND} clients per round, 20 experts, "
        f"1 local step, {args.rounds} rounds (medians of rounds 1..{args.rounds - 2}), "
        f"{args.threads} torch thread(s)"
    )
    rows = [_child(n, args.rounds, args.threads) for n in SIZES]
    print(_table(rows, rsea_seconds(args.rsea_repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
