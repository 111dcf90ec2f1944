"""bf16 vs fp32 backbone parity (benchmarks/PROTOCOL.md, "Amendment: bf16 vs fp32"): FedAMoLE's
test accuracy at each client's validation-selected round in two comparisons that differ only in
`model.dtype`, and the 95 % paired hierarchical bootstrap interval of bf16 minus fp32.

    python benchmarks/dtype_parity.py runs/parity_float32 runs/parity_bfloat16 [--seeds 42,43,44]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedamole.compare import run_dir_for, selected_scores
from fedamole.stats import bootstrap_difference, bootstrap_mean

METHOD, METRIC = "fedamole", "accuracy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("fp32", type=Path)
    parser.add_argument("bf16", type=Path)
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = {"fp32": args.fp32, "bf16": args.bf16}
    scores = {
        arm: {s: selected_scores(run_dir_for(out, METHOD, s), METRIC) for s in seeds}
        for arm, out in arms.items()
    }
    print(f"FedAMoLE, SNLI Dir(1.0), seeds {seeds}; test {METRIC} at validation-selected rounds\n")
    print("| backbone | mean | 95 % interval | wall s per run (mean) |")
    print("|---|---|---|---|")
    for arm, out in arms.items():
        estimate = bootstrap_mean(scores[arm])
        walls = [
            json.loads((run_dir_for(out, METHOD, s) / "summary.json").read_text())["wall_time_s"]
            for s in seeds
        ]
        print(
            f"| {arm} | {estimate.mean:.4f} | [{estimate.low:.4f}, {estimate.high:.4f}] | "
            f"{sum(walls) / len(walls):.0f} |"
        )
    diff = bootstrap_difference(scores["bf16"], scores["fp32"])
    examples = sum(len(c) for s in seeds for c in scores["fp32"][s])
    print(
        f"\nbf16 - fp32: {diff.mean:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}] "
        f"(width {diff.high - diff.low:.4f}, {examples} paired test examples); "
        f"interval includes 0: {diff.includes_zero}"
    )


if __name__ == "__main__":
    main()
