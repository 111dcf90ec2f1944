"""`fedamole compare`: several methods on identical data, splits, seeds and budgets.

Each (method, seed) is an ordinary run directory ``DIR/<method>/seed<k>/`` made by the in-process
runner, so a comparison can be stopped and restarted: finished runs (with a summary.json) are
skipped and a killed one is resumed from its last checkpoint. The comparison itself is
``DIR/summary.json``, ``DIR/table.md`` and ``DIR/comparison.png``.

The headline number of a method is the mean over clients of the test metric at each client's
validation-selected round (SPEC 6: selection never looks at test), then mean and standard
deviation over seeds; the last round's numbers are reported beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402

from fedamole.config import ConfigError, load_config  # noqa: E402
from fedamole.files import atomic_write_text  # noqa: E402
from fedamole.methods import FEDAMOLE_VARIANTS, METHODS, get_method  # noqa: E402
from fedamole.reporting import CONFIG_FILE, SUMMARY  # noqa: E402
from fedamole.transports.in_process import run_simulation  # noqa: E402

HEADLINE = "selected"
HEADLINE_NOTE = (
    "test metric, mean over clients, each client at its validation-selected round; "
    "mean and std (ddof=1; 0 for one seed) over seeds"
)
TABLE = "table.md"
PLOT = "comparison.png"


def run_dir_for(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def parse_methods(text: str, option: str = "--methods") -> list[str]:
    """Comma-separated method names, checked before anything runs."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ConfigError(
            f"{option}: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}"
        )
    return names


def compare(
    config: Path | None,
    methods: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str],
    out: Path,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every (method, seed) not finished yet, then write the comparison; returns it."""
    console = console or Console()
    for name in methods:
        get_method(name)  # unknown names fail before any run starts
    for seed in seeds:
        for name in methods:
            run_dir = run_dir_for(out, name, seed)
            if (run_dir / SUMMARY).is_file():
                console.print(f"[dim]{name} seed {seed}: finished, skipped[/]")
                continue
            cfg = load_config(config, [*overrides, f"seed={seed}", f"output.dir={run_dir}"])
            resume = (run_dir / CONFIG_FILE).is_file()
            console.rule(f"{name} seed {seed}" + (" (resuming)" if resume else ""))
            run_simulation(cfg, resume=resume, console=console, method=name)
    result = summarise_comparison(out, methods, seeds)
    write_comparison(out, result)
    console.print(render_table(result))
    console.print(f"comparison in {out}/ ({SUMMARY}, {TABLE}, {PLOT})")
    return result


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _method_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std over seeds of one method's run summaries, per client and overall."""
    metric = runs[0]["metric"]
    headline = [run["mean"][HEADLINE][metric] for run in runs]
    last = [run["mean"]["last"][metric] for run in runs]
    clients = runs[0]["per_client"]
    return {
        "mean": float(np.mean(headline)),
        "std": _std(headline),
        "per_seed": headline,
        "last": {"mean": float(np.mean(last)), "std": _std(last), "per_seed": last},
        "per_client": {
            cid: float(np.mean([run["per_client"][cid][HEADLINE][metric] for run in runs]))
            for cid in clients
        },
        "bytes_per_round": float(
            np.mean([(r["total_bytes_up"] + r["total_bytes_down"]) / r["rounds"] for r in runs])
        ),
        "wall_time_s": float(np.sum([run["wall_time_s"] for run in runs])),
    }


def summarise_comparison(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> dict:
    """The comparison from the runs' summary.json files; the gain is FedAMoLE's relative
    improvement over the best non-FedAMoLE method."""
    runs = {
        name: [json.loads((run_dir_for(out, name, s) / SUMMARY).read_text()) for s in seeds]
        for name in methods
    }
    per_method = {name: _method_summary(summaries) for name, summaries in runs.items()}
    result: dict[str, Any] = {
        "metric": runs[methods[0]][0]["metric"],
        "round": HEADLINE,
        "note": HEADLINE_NOTE,
        "seeds": list(seeds),
        "methods": per_method,
    }
    baselines = [name for name in methods if name not in FEDAMOLE_VARIANTS]
    if "fedamole" in per_method and baselines:
        best = max(baselines, key=lambda name: per_method[name]["mean"])
        base = per_method[best]["mean"]
        result["best_baseline"] = best
        result["fedamole_gain_over_best_baseline"] = (
            (per_method["fedamole"]["mean"] - base) / base if base else None
        )
    return result


def render_table(result: dict[str, Any]) -> str:
    """Markdown: one row per method, then per-client values."""
    metric, methods = result["metric"], result["methods"]
    lines = [
        f"Test {metric} ({result['note']}); seeds {result['seeds']}.",
        "",
        f"| method | {metric} (val-selected) | {metric} (last round) | bytes / round | "
        "wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        lines.append(
            f"| {name} | {m['mean']:.4f} ± {m['std']:.4f} | "
            f"{m['last']['mean']:.4f} ± {m['last']['std']:.4f} | {m['bytes_per_round']:,.0f} | "
            f"{m['wall_time_s']:,.0f} |"
        )
    clients = list(next(iter(methods.values()))["per_client"])
    lines += [
        "",
        f"Per client (val-selected {metric}, mean over seeds):",
        "",
        "| method | " + " | ".join(f"client {c}" for c in clients) + " |",
        "|---|" + "---|" * len(clients),
    ]
    for name, m in methods.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{m['per_client'][c]:.4f}" for c in clients) + " |"
        )
    if "best_baseline" in result:
        gain = result["fedamole_gain_over_best_baseline"]
        text = "n/a (best baseline scores 0)" if gain is None else f"{100 * gain:+.2f} %"
        lines += [
            "",
            f"Relative gain of fedamole over the best baseline ({result['best_baseline']}): {text}",
        ]
    return "\n".join(lines) + "\n"


def plot_comparison(path: Path, result: dict[str, Any]) -> None:
    """Bar per method (FedAMoLE variants highlighted) with the std over seeds as error bars."""
    names = list(result["methods"])
    means = [result["methods"][n]["mean"] for n in names]
    stds = [result["methods"][n]["std"] for n in names]
    colors = ["tab:orange" if n in FEDAMOLE_VARIANTS else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    ax.bar(names, means, yerr=stds, color=colors, capsize=4)
    ax.set(
        ylabel=f"test {result['metric']}",
        title=f"validation-selected round; error bars: std over seeds {result['seeds']}",
    )
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(out: Path, result: dict[str, Any]) -> None:
    atomic_write_text(out / SUMMARY, json.dumps(result, indent=2))
    atomic_write_text(out / TABLE, render_table(result))
    plot_comparison(out / PLOT, result)
