"""The comparisons `benchmarks/PROTOCOL.md` fixed in advance, read off a finished `fedamole compare`
directory: the best baseline chosen by validation (never test), then FedAMoLE minus that baseline
and minus FedAMoLE-R, and, where FedAMoLE-C ran, FedAMoLE-C minus FedAMoLE and minus FedAMoLE-R;
each a 95 % paired hierarchical bootstrap interval over seeds, clients and test examples, with its
width. Also each FedAMoLE variant's assignment change per re-assignment.

    python benchmarks/protocol_report.py --out runs/protocol_snli_dir1.0 --seeds 42,43,44
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedamole.compare import (
    HEADLINE,
    OPTIMISTIC_NOTE,
    WORST_NOTE,
    best_test_round_score,
    run_dir_for,
    selected_scores,
    worst_client_score,
)
from fedamole.methods import FEDAMOLE_VARIANTS
from fedamole.reporting import RunDir
from fedamole.stats import bootstrap_difference

PAIRS = [
    ("fedamole", "fedamole-r"),
    ("fedamole-c", "fedamole"),
    ("fedamole-c", "fedamole-r"),
]


def validation_mean(run_dir: Path, metric: str) -> float:
    """Mean over clients of the validation metric at each client's selected round."""
    run = RunDir(run_dir)
    selected = {int(c): v[HEADLINE]["round"] for c, v in run.read_summary()["per_client"].items()}
    values = {
        r["client"]: r[metric]
        for r in run.read_records()
        if r["split"] == "val" and selected.get(r["client"]) == r["round"]
    }
    return float(np.mean([values[c] for c in sorted(selected)]))


def differing_share(
    first: dict[int, list[np.ndarray]], second: dict[int, list[np.ndarray]]
) -> float:
    """The share of paired test examples (over seeds and clients) whose scores differ: what
    sets the width a paired comparison can reach (a pilot's figure for sizing a design)."""
    pairs = [(a, b) for seed in first for a, b in zip(first[seed], second[seed], strict=True)]
    differ = sum(int(np.sum(a != b)) for a, b in pairs)
    return differ / sum(len(a) for a, _ in pairs)


def present_methods(out: Path, seeds: list[int]) -> list[str]:
    """Methods whose every seed finished (a summary exists)."""
    names = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "logs")
    return [
        n for n in names if all((run_dir_for(out, n, s) / "summary.json").exists() for s in seeds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the compare output directory")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--metric", default="accuracy")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = present_methods(args.out, seeds)
    scores = {
        m: {s: selected_scores(run_dir_for(args.out, m, s), args.metric) for s in seeds}
        for m in methods
    }
    val = {
        m: np.mean([validation_mean(run_dir_for(args.out, m, s), args.metric) for s in seeds])
        for m in methods
    }
    test = {m: np.mean([np.mean([c.mean() for c in scores[m][s]]) for s in seeds]) for m in methods}
    best_test = {
        m: np.mean([best_test_round_score(run_dir_for(args.out, m, s), args.metric) for s in seeds])
        for m in methods
    }
    worst = {
        m: np.mean(
            [
                worst_client_score(RunDir(run_dir_for(args.out, m, s)).read_summary(), args.metric)
                for s in seeds
            ]
        )
        for m in methods
    }
    n_test = sum(len(c) for c in scores[methods[0]][seeds[0]])
    print(f"{args.out}: seeds {seeds}, {n_test} test examples per seed (seed {seeds[0]})")
    print(f"{OPTIMISTIC_NOTE} {WORST_NOTE}\n")
    print(
        f"| method | validation {args.metric} (selected rounds) | test {args.metric} | "
        "best test round (optimistic) | worst client |"
    )
    print("|---|---|---|---|---|")
    for m in methods:
        print(f"| {m} | {val[m]:.4f} | {test[m]:.4f} | {best_test[m]:.4f} | {worst[m]:.4f} |")
    baselines = [m for m in methods if m not in FEDAMOLE_VARIANTS]
    pairs = list(PAIRS)
    if baselines:
        best = max(baselines, key=lambda m: val[m])
        print(f"\nbest baseline by validation {args.metric}: {best}")
        pairs.insert(0, ("fedamole", best))
    print(
        "\n| comparison | difference | 95 % paired interval | width | includes 0 | "
        "examples that differ |"
    )
    print("|---|---|---|---|---|---|")
    for a, b in pairs:
        if a in methods and b in methods:
            d = bootstrap_difference(scores[a], scores[b])
            print(
                f"| {a} - {b} | {d.mean:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | "
                f"{d.high - d.low:.4f} | {'yes' if d.includes_zero else 'no'} | "
                f"{differing_share(scores[a], scores[b]):.3f} |"
            )
    print("\nassignment change per re-assignment (mean over seeds):")
    for m in methods:
        if m in FEDAMOLE_VARIANTS:
            changes = [
                [
                    r["rsea_assignment_change"]
                    for r in RunDir(run_dir_for(args.out, m, s)).read_records()
                    if r["split"] == "server"
                ]
                for s in seeds
            ]
            print(f"- {m}: {np.round(np.mean(changes, axis=0), 3).tolist()}")


if __name__ == "__main__":
    main()
