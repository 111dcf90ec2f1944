"""Budget curve (issue 17, benchmarks/PROTOCOL.md): FedAMoLE and FedAMoLE-R at increasing local
training, with RSEA's diagnostics and the paired test difference per round.

Hypothesis (a): the budget is too small for experts and router to align; then, as local steps
grow, P sharpens (max/min up, entropy down), the assignment churns less and experts prefer the
clients that trained them. Hypothesis (b): RSEA lacks continuity whatever the budget; then those
figures stay flat. Each budget is an ordinary resumable ``fedamole compare`` directory, so a
killed run continues where it stopped.

    .venv/bin/python benchmarks/budget_curve.py            # the protocol's settings
    .venv/bin/python benchmarks/budget_curve.py --steps 1,2 --set model.name=tiny-random-llama \
        --set data.source=synthetic --out /tmp/curve      # a quick check

Writes ``budget_curve.md`` (table) and ``budget_curve.png`` next to ``--report`` (default:
this folder).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedamole.compare import compare  # noqa: E402
from fedamole.reporting import RunDir  # noqa: E402
from fedamole.stats import bootstrap_difference  # noqa: E402

METHODS = ("fedamole", "fedamole-r")
PROTOCOL = [
    "data.path=../shared/data/snli/snli_sample.jsonl",
    "data.dirichlet_alpha=1.0",
    "federation.num_clients=3",
    "hmole.num_experts=6",
    "federation.rounds=3",
    "federation.batch_size=2",
    "data.val_cap=10",
    "data.test_cap=40",
]
DIAGNOSTICS = {
    "P max/min (median)": "rsea_p_max_over_min_median",
    "P entropy / log N_c": "rsea_p_entropy_norm_mean",
    "assignment change": "rsea_assignment_change",
    "holder preference": "rsea_holder_preference",
}


def round_scores(run: Path, metric: str) -> dict[int, list[np.ndarray]]:
    """round -> per client (by id) its test examples' ``metric``."""
    rows = [r for r in RunDir(run).read_example_scores() if r["split"] == "test"]
    out: dict[int, list[np.ndarray]] = {}
    for r in sorted(rows, key=lambda r: (r["round"], r["client"])):
        out.setdefault(r["round"], []).append(np.asarray(r[metric], dtype=float))
    return out


def budget_rows(out: Path, steps: int, seed: int) -> list[dict[str, float]]:
    """Per round: RSEA's diagnostics of FedAMoLE and the paired test difference to -R."""
    summary = RunDir(out / "fedamole" / f"seed{seed}").read_summary()
    metric = summary["metric"]
    ours = round_scores(out / "fedamole" / f"seed{seed}", metric)
    random = round_scores(out / "fedamole-r" / f"seed{seed}", metric)
    server = {
        r["round"]: r
        for r in RunDir(out / "fedamole" / f"seed{seed}").read_records()
        if r["split"] == "server"
    }
    rows = []
    for k in sorted(ours):
        diff = bootstrap_difference({seed: ours[k]}, {seed: random[k]})
        row = {"steps": steps, "round": k, "difference": diff.mean}
        row |= {"low": diff.low, "high": diff.high}
        row |= {name: server.get(k, {}).get(key, float("nan")) for name, key in DIAGNOSTICS.items()}
        rows.append(row)
    return rows


def render(rows: list[dict[str, float]], header: str) -> str:
    names = list(DIAGNOSTICS)
    lines = [
        header,
        "",
        "| local steps | round | " + " | ".join(names) + " | test metric, FedAMoLE - FedAMoLE-R "
        "[95 % paired] |",
        "|---" * (len(names) + 3) + "|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[n]:.3f}" for n in names)
        lines.append(
            f"| {r['steps']} | {r['round']} | {cells} | {r['difference']:+.4f} "
            f"[{r['low']:+.4f}, {r['high']:+.4f}] |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, float]], path: Path) -> None:
    panels = [*DIAGNOSTICS, "difference"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, name in zip(axes, panels, strict=True):
        for steps in sorted({r["steps"] for r in rows}):
            mine = [r for r in rows if r["steps"] == steps]
            ax.plot([r["round"] for r in mine], [r[name] for r in mine], "o-", label=f"{steps}")
        ax.set_title(name if name != "difference" else "test metric, FedAMoLE - R")
        ax.set_xlabel("round")
    axes[0].legend(title="local steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/snli_dir1.0.yaml"))
    parser.add_argument("--steps", default="4,16,64", help="local steps per round, comma-separated")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/budget_curve"))
    parser.add_argument("--report", type=Path, default=Path(__file__).parent)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows: list[dict[str, float]] = []
    for steps in [int(s) for s in args.steps.split(",")]:
        out = args.out / f"steps{steps}"
        overrides = [*PROTOCOL, *args.overrides, f"federation.local_steps={steps}"]
        compare(args.config, METHODS, [args.seed], overrides, out, jobs=args.jobs)
        rows += budget_rows(out, steps, args.seed)
    header = (
        f"Budget curve: `{args.config}` + {' '.join(PROTOCOL + args.overrides)}, seed "
        f"{args.seed}, local steps {args.steps}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}. Command: "
        f"`python {' '.join(sys.argv)}`."
    )
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "budget_curve.md").write_text(render(rows, header))
    plot(rows, args.report / "budget_curve.png")
    print(render(rows, header))


if __name__ == "__main__":
    main()
