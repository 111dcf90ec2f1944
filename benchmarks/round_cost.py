"""Where a federated round's wall time goes (issue 30), before and after the round-cost changes,
for the embedded default run and for the protocol's SNLI scenario, on this machine in one run.

Each arm is one in-process `fedamole run` in its own process (a fresh model, no shared caches)
under cProfile; a phase is the cumulative time of the functions that do it, so the shares add up
to the run's wall time with "other" the rest. cProfile adds a little per Python call; the
before/after ratio is what the table is for, and both arms pay it alike.

    python benchmarks/round_cost.py                       # both scenarios, before and after
    python benchmarks/round_cost.py --scenarios snli --rounds 1

"before" is today's path selected by settings (`--before`), "after" the defaults (`--after`).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

SCENARIOS = {
    "default": ["--config", str(ROOT / "configs/default.yaml")],
    "snli": [
        "--config",
        str(ROOT / "configs/snli_dir1.0.yaml"),
        "--set",
        f"data.path={SHARED / 'snli/snli_sample.jsonl'}",
        "--set",
        "data.train_frac=0.45",
        "--set",
        "data.aux_frac=0.05",
        "--set",
        "data.val_frac=0.1",
        "--set",
        "data.test_frac=0.4",
    ],
}

# phase -> (module path suffix, function name) whose cumulative time it is; none nests in another
# except the server's round completion, which contains aggregation (subtracted below).
PHASES: dict[str, list[tuple[str, str]]] = {
    "model set-up (load, inject adapters)": [("transports/setup.py", "build_clients")],
    "base-model scores (eval.base_model)": [("transports/in_process.py", "base_model_scores")],
    "local training steps": [("federation/training.py", "train_steps")],
    "validation + test scoring": [("federation/client.py", "evaluate_client")],
    "RSEA embeddings (client)": [("rsea/embeddings.py", "compute_embeddings")],
    "server: RSEA solve + diagnostics": [("methods/fedamole.py", "complete_round")],
    "server: aggregation": [("fedamole/aggregation.py", "aggregate")],
    "adapter swap (load a client's tensors)": [
        ("hmole/adapter.py", "set_architecture"),
        ("hmole/adapter.py", "load_state"),
        ("methods/peft_method.py", "load"),
    ],
    "checkpoint, records, plots": [
        ("fedamole/reporting.py", name)
        for name in (
            "save_checkpoint",
            "append_round",
            "write_manifest",
            "write_assignment",
            "write_summary",
            "write_plots",
            "save_client_model",
        )
    ],
    "data: read, split, tokenise": [("transports/setup.py", "open_run")],
}


# phases a run pays once, whatever its number of rounds ("other" is mostly imports and start-up)
ONCE_PER_RUN = {
    "model set-up (load, inject adapters)",
    "base-model scores (eval.base_model)",
    "data: read, split, tokenise",
    "other",
}


def profile_arm(args: list[str], out: Path) -> dict[str, float]:
    """Run `fedamole run ARGS --out OUT` here under cProfile; phase -> seconds (+ wall)."""
    from fedamole.cli import app

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    try:
        app([*args, "--out", str(out)], standalone_mode=False)
    finally:
        profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    cumulative: dict[tuple[str, str], float] = {}
    for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.items():
        for phase_functions in PHASES.values():
            for suffix, function in phase_functions:
                if name == function and file.endswith(suffix):
                    cumulative[(suffix, function)] = cumulative.get((suffix, function), 0.0) + ct
    phases = {
        phase: sum(cumulative.get(f, 0.0) for f in functions) for phase, functions in PHASES.items()
    }
    phases["server: RSEA solve + diagnostics"] -= phases["server: aggregation"] * (
        phases["server: RSEA solve + diagnostics"] > 0
    )
    summary = json.loads((out / "summary.json").read_text())
    phases["other"] = wall - sum(phases.values())
    return {**phases, "wall": wall, "rounds": summary["rounds"]}


def run_arm(scenario: str, overrides: list[str], rounds: int, method: str) -> dict[str, float]:
    """One arm in a fresh interpreter, so arms share no warm caches or allocator state."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["run", "--method", method, *SCENARIOS[scenario]]
        args += ["--set", f"federation.rounds={rounds}"]
        for override in overrides:
            args += ["--set", override]
        done = subprocess.run(
            [sys.executable, __file__, "--arm", json.dumps(args), "--arm-out", f"{tmp}/run"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"{scenario} {overrides}: failed\n{done.stdout}\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def table(scenario: str, before: dict[str, float], after: dict[str, float]) -> str:
    rounds = before["rounds"]
    lines = [
        f"\n### {scenario}: {rounds} round(s); seconds and share of the run's wall time\n",
        "| phase | before s | share | after s | share |",
        "|---|---|---|---|---|",
    ]
    phases = [p for p in before if p not in ("wall", "rounds")]
    for phase in sorted(phases, key=lambda p: -before[p]):
        lines.append(
            f"| {phase} | {before[phase]:.1f} | {before[phase] / before['wall']:.0%} | "
            f"{after[phase]:.1f} | {after[phase] / after['wall']:.0%} |"
        )
    lines.append(f"| **run wall time** | **{before['wall']:.1f}** | | **{after['wall']:.1f}** | |")
    per_round = [
        sum(arm[p] for p in phases if p not in ONCE_PER_RUN) / rounds for arm in (before, after)
    ]
    lines.append(
        f"\nper round (the phases every round runs, / rounds): before {per_round[0]:.1f} s, "
        f"after {per_round[1]:.1f} s, after/before = **{per_round[1] / per_round[0]:.2f}x**"
    )
    return "\n".join(lines)


def machine() -> str:
    import torch

    from fedamole.device import cpu_flags

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    bf16 = {"avx512_bf16", "amx_bf16"} & cpu_flags()
    return (
        f"{os.cpu_count()} CPUs ({model}; bf16 in hardware: {sorted(bf16) or 'no'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", default="default,snli", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--method", default="fedamole")
    parser.add_argument(
        "--before",
        default="model.dtype=float32,eval.choice_scoring=full",
        help="comma-separated --set overrides selecting today's path",
    )
    parser.add_argument("--after", default="", help="comma-separated --set overrides")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(profile_arm(json.loads(args.arm), Path(args.arm_out))))
        return
    print(f"machine: {machine()}")
    print(
        f"method {args.method}; before: --set {args.before or '(defaults)'}; "
        f"after: --set {args.after or '(defaults)'}"
    )
    for scenario in args.scenarios.split(","):
        before = run_arm(
            scenario, [o for o in args.before.split(",") if o], args.rounds, args.method
        )
        after = run_arm(scenario, [o for o in args.after.split(",") if o], args.rounds, args.method)
        print(table(scenario, before, after), flush=True)


if __name__ == "__main__":
    main()
