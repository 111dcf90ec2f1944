"""`fedamole compare`: several methods on identical data, splits, seeds and budgets, and how sure
we can be of the differences.

Each (method, seed) is an ordinary run directory ``DIR/<method>/seed<k>/``, so a comparison can
be stopped and restarted: finished runs (with a summary.json) are skipped and a killed one is
resumed from its last checkpoint. ``--jobs N`` runs N of them at once as separate processes (each
with its own run directory and ``DIR/logs/<method>-seed<k>.log``); on one GPU this uses the card
far better than one run at a time (see the README on CUDA MPS).

The headline number of a method is the mean over clients of the test metric at each client's
validation-selected round (SPEC 6: selection never looks at test), averaged over seeds, with a
95 % hierarchical bootstrap interval over clients and test examples (:mod:`fedamole.stats`), and
each method's paired difference to FedAMoLE on the same examples. The comparison is
``DIR/summary.json``, ``DIR/report.md`` (with ``table.md``, the same tables), ``DIR/comparison.png``
(headline with intervals) and ``DIR/curves.png`` (mean test metric per round of every method).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # noqa: E402

from fedamole.config import ConfigError, load_config  # noqa: E402
from fedamole.errors import UserError
from fedamole.files import atomic_write_text  # noqa: E402
from fedamole.methods import FEDAMOLE_VARIANTS, METHODS  # noqa: E402
from fedamole.reporting import CONFIG_FILE, SERVER, SUMMARY, RunDir  # noqa: E402
from fedamole.stats import Estimate, bootstrap_difference, bootstrap_mean  # noqa: E402
from fedamole.transports.in_process import run_in_process  # noqa: E402
from fedamole.transports.setup import checked  # noqa: E402

HEADLINE = "selected"
HEADLINE_NOTE = (
    "test metric, mean over clients, each client at its validation-selected round; mean over "
    "seeds; 95 % hierarchical bootstrap interval over clients and test examples"
)
OPTIMISTIC_NOTE = (
    "Best test round (optimistic): mean over clients of each client's best test round, the "
    "paper's metric; it looks at test, so it is never used to choose a method."
)
WORST_NOTE = "Worst client: the lowest client's score at its validation-selected round."
REFERENCE = "fedamole"
REPORT, TABLE, PLOT, CURVES, LOGS = "report.md", "table.md", "comparison.png", "curves.png", "logs"


class ComparisonError(UserError, RuntimeError):
    """Some runs of a comparison failed; the message names them and their logs."""


def check_out(out: Path) -> None:
    """A comparison writes into an empty or new folder, or continues one of its own: anything
    else there (a run's files, someone's documents) would be mixed with it or replaced."""
    own = {SUMMARY, REPORT, TABLE, PLOT, CURVES, LOGS, *METHODS}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        foreign = [out.name]
    if foreign:
        raise ConfigError(
            f"--out {out}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
            "which no comparison writes; a comparison goes into a new or empty folder, or one of "
            "its own to continue it: choose another --out"
        )


@dataclass(frozen=True)
class Job:
    """One (method, seed) run of a comparison."""

    method: str
    seed: int
    out: Path

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.out, self.method, self.seed)

    @property
    def log(self) -> Path:
        return self.out / LOGS / f"{self.method}-seed{self.seed}.log"

    @property
    def resume(self) -> bool:
        return (self.run_dir / CONFIG_FILE).is_file()


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
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every (method, seed) not finished yet, then write the comparison; returns it."""
    console = console or Console()
    check_out(out)
    for seed in seeds:  # every method and config is checked before any run starts
        cfg = load_config(config, [*overrides, f"seed={seed}"])
        for name in methods:
            checked(cfg, name)
    pending = [Job(name, seed, out) for seed in seeds for name in methods]
    pending = [job for job in pending if not (job.run_dir / SUMMARY).is_file()]
    if jobs > 1:
        _run_in_parallel(config, overrides, pending, jobs, console)
    else:
        for job in pending:
            cfg = load_config(config, [*overrides, f"seed={job.seed}", f"output.dir={job.run_dir}"])
            console.rule(f"{job.method} seed {job.seed}" + (" (resuming)" if job.resume else ""))
            run_in_process(cfg, resume=job.resume, console=console, method=job.method)
    result = summarise_comparison(out, methods, seeds)
    write_comparison(out, result)
    console.print(render_table(result))
    console.print(f"comparison in {out}/ ({REPORT}, {SUMMARY}, {PLOT}, {CURVES})")
    return result


def _command(config: Path | None, overrides: Sequence[str], job: Job) -> list[str]:
    """The `fedamole run` command line of one job."""
    cmd = [sys.executable, "-m", "fedamole.cli", "run", "--method", job.method]
    cmd += ["--config", str(config)] if config else []
    for item in [*overrides, f"seed={job.seed}", f"output.dir={job.run_dir}"]:
        cmd += ["--set", item]
    return cmd + (["--resume"] if job.resume else [])


def _run_in_parallel(
    config: Path | None, overrides: Sequence[str], pending: list[Job], jobs: int, console: Console
) -> None:
    """Each job in its own process, at most ``jobs`` at once; on a CPU the cores are shared out
    (OMP_NUM_THREADS, unless set). Raises after all have ended if any failed."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    env["PYTHONUNBUFFERED"] = "1"

    def run(job: Job) -> int:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with job.log.open("a") as log:
            return subprocess.run(
                _command(config, overrides, job), stdout=log, stderr=subprocess.STDOUT, env=env
            ).returncode

    failed = []
    with (
        Progress(
            TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), console=console
        ) as progress,
        ThreadPoolExecutor(max_workers=jobs) as pool,
    ):
        task = progress.add_task("runs", total=len(pending))
        for job, code in zip(pending, pool.map(run, pending), strict=True):
            progress.advance(task)
            if code != 0:
                failed.append(f"{job.method} seed {job.seed} (exit {code}, log {job.log})")
    if failed:
        raise ComparisonError("runs failed: " + "; ".join(failed))


# ---------------------------------------------------------------------------------- statistics
def selected_scores(run_dir: Path, metric: str) -> list[np.ndarray]:
    """Per client (by id), its test examples' ``metric`` at its validation-selected round."""
    run = RunDir(run_dir)
    summary = run.read_summary()
    rows = {
        (r["client"], r["round"]): r[metric]
        for r in run.read_example_scores()
        if r["split"] == "test"
    }
    return [
        np.asarray(rows[(int(client), values[HEADLINE]["round"])], dtype=float)
        for client, values in sorted(summary["per_client"].items(), key=lambda kv: int(kv[0]))
    ]


def best_test_round_score(run_dir: Path, metric: str) -> float:
    """The paper's metric: mean over clients of each client's best test ``metric`` over its
    rounds. It picks rounds by looking at test, so it is optimistic and never chooses a method;
    it is here so our numbers can be held against the paper's."""
    per_client: dict[int, list[float]] = {}
    for r in RunDir(run_dir).read_records():
        if r["split"] == "test":
            per_client.setdefault(r["client"], []).append(r[metric])
    return float(np.mean([max(values) for values in per_client.values()]))


def worst_client_score(summary: dict[str, Any], metric: str) -> float:
    """The lowest client's test ``metric`` at its validation-selected round: what the
    organisation that gains least (or loses most) by joining gets."""
    return min(c[HEADLINE][metric] for c in summary["per_client"].values())


def _estimate_doc(estimate: Estimate) -> dict[str, float | bool]:
    return {
        "mean": estimate.mean,
        "low": estimate.low,
        "high": estimate.high,
        "includes_zero": estimate.includes_zero,
    }


def _method_summary(
    runs: list[dict[str, Any]], run_dirs: list[Path], interval: Estimate
) -> dict[str, Any]:
    """One method over its seeds: headline with interval, last round, the paper's optimistic
    best test round, the worst client, per client, cost."""
    metric = runs[0]["metric"]
    headline = [run["mean"][HEADLINE][metric] for run in runs]
    last = [run["mean"]["last"][metric] for run in runs]
    best = [run["best_round"][metric] for run in runs]
    return {
        "mean": float(np.mean(headline)),
        "interval": _estimate_doc(interval),
        "per_seed": headline,
        "last": float(np.mean(last)),
        "best_round": float(np.mean(best)),
        "best_test_round": float(np.mean([best_test_round_score(d, metric) for d in run_dirs])),
        "worst_client": float(np.mean([worst_client_score(run, metric) for run in runs])),
        "per_client": {
            cid: float(np.mean([run["per_client"][cid][HEADLINE][metric] for run in runs]))
            for cid in runs[0]["per_client"]
        },
        "bytes_up_per_round": float(np.mean([r["total_bytes_up"] / r["rounds"] for r in runs])),
        "bytes_down_per_round": float(np.mean([r["total_bytes_down"] / r["rounds"] for r in runs])),
        "wall_time_s": float(np.sum([run["wall_time_s"] for run in runs])),
    }


def summarise_comparison(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> dict:
    """The comparison from the runs' summaries and per-example scores: every method's headline
    with its interval, and its paired difference to FedAMoLE (or to the first method)."""
    runs = {
        name: [RunDir(run_dir_for(out, name, s)).read_summary() for s in seeds] for name in methods
    }
    metric = runs[methods[0]][0]["metric"]
    scores = {
        name: {s: selected_scores(run_dir_for(out, name, s), metric) for s in seeds}
        for name in methods
    }
    reference = REFERENCE if REFERENCE in methods else methods[0]
    per_method = {
        name: _method_summary(
            runs[name], [run_dir_for(out, name, s) for s in seeds], bootstrap_mean(scores[name])
        )
        for name in methods
    }
    for name in methods:
        if name != reference:
            difference = bootstrap_difference(scores[name], scores[reference])
            per_method[name]["difference"] = _estimate_doc(difference)
    return {
        "metric": metric,
        "round": HEADLINE,
        "note": HEADLINE_NOTE,
        "seeds": list(seeds),
        "reference": reference,
        "methods": per_method,
        "curves": {name: _curve(out, name, seeds, metric) for name in methods},
        "diagnostics": {
            name: diagnostics for name in methods if (diagnostics := _diagnostics(out, name, seeds))
        },
    }


def _diagnostics(out: Path, method: str, seeds: Sequence[int]) -> dict[str, list[float]]:
    """The server's per-round diagnostics (RSEA's), each averaged over seeds; {} if none."""
    per_seed = [
        [r for r in RunDir(run_dir_for(out, method, s)).read_records() if r["split"] == SERVER]
        for s in seeds
    ]
    names = sorted({k for rows in per_seed for r in rows for k in r} - {"round", "split"})
    return {
        name: [
            float(np.mean([rows[k][name] for rows in per_seed if name in rows[k]]))
            for k in range(min(len(rows) for rows in per_seed))
        ]
        for name in names
    }


def _curve(out: Path, method: str, seeds: Sequence[int], metric: str) -> list[float]:
    """Mean test metric over clients per round, averaged over seeds."""
    per_seed = []
    for seed in seeds:
        records = RunDir(run_dir_for(out, method, seed)).read_records()
        rounds = sorted({r["round"] for r in records if r["split"] == "test"})
        per_seed.append(
            [
                np.mean([r[metric] for r in records if r["split"] == "test" and r["round"] == k])
                for k in rounds
            ]
        )
    return [float(v) for v in np.mean(per_seed, axis=0)]


# ---------------------------------------------------------------------------------- report
def _interval(doc: dict[str, Any]) -> str:
    return f"[{doc['low']:.4f}, {doc['high']:.4f}]"


def render_table(result: dict[str, Any]) -> str:
    """Markdown: headline with intervals and paired differences, cost, then per client."""
    metric, methods, reference = result["metric"], result["methods"], result["reference"]
    lines = [
        f"Test {metric} ({result['note']}); seeds {result['seeds']}; differences are paired, "
        f"method minus {reference}. {OPTIMISTIC_NOTE} {WORST_NOTE}",
        "",
        f"| method | {metric} | 95 % interval | minus {reference} | 95 % interval | "
        "last round | best mean-val round | best test round (optimistic) | worst client | "
        "bytes up / round | bytes down / round | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        difference = m.get("difference")
        diff = (f"{difference['mean']:+.4f}", _interval(difference)) if difference else ("", "")
        lines.append(
            f"| {name} | {m['mean']:.4f} | {_interval(m['interval'])} | {diff[0]} | {diff[1]} | "
            f"{m['last']:.4f} | {m['best_round']:.4f} | {m['best_test_round']:.4f} | "
            f"{m['worst_client']:.4f} | {m['bytes_up_per_round']:,.0f} | "
            f"{m['bytes_down_per_round']:,.0f} | {m['wall_time_s']:,.0f} |"
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
    return "\n".join(lines) + "\n"


def verdicts(result: dict[str, Any]) -> list[str]:
    """One sentence per method on whether its difference to the reference is resolved."""
    out = []
    for name, m in result["methods"].items():
        difference = m.get("difference")
        if difference is None:
            continue
        if difference["includes_zero"]:
            out.append(
                f"- {name} vs {result['reference']}: the interval {_interval(difference)} "
                "includes 0, so this comparison cannot tell them apart."
            )
        else:
            better = name if difference["mean"] > 0 else result["reference"]
            out.append(
                f"- {name} vs {result['reference']}: {better} is better by "
                f"{abs(difference['mean']):.4f} (interval {_interval(difference)} excludes 0)."
            )
    return out


def render_diagnostics(result: dict[str, Any]) -> list[str]:
    """Per method with server diagnostics (FedAMoLE variants), one row per round."""
    lines: list[str] = []
    for name, series in result.get("diagnostics", {}).items():
        columns = list(series)
        lines += [
            f"### {name}",
            "",
            "| round | " + " | ".join(c.removeprefix("rsea_") for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for k in range(len(next(iter(series.values())))):
            lines.append(f"| {k} | " + " | ".join(f"{series[c][k]:.4f}" for c in columns) + " |")
        lines.append("")
    if lines:
        lines = [
            "## RSEA diagnostics (mean over seeds, per round; see benchmarks/RESULTS.md)",
            "",
            *lines,
        ]
    return lines


def render_report(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"# Comparison of {', '.join(result['methods'])}",
            "",
            render_table(result),
            "## What the intervals say",
            "",
            *verdicts(result),
            "",
            *render_diagnostics(result),
            f"![headline with intervals]({PLOT})",
            "",
            f"![mean test {result['metric']} per round]({CURVES})",
            "",
        ]
    )


def plot_comparison(path: Path, result: dict[str, Any]) -> None:
    """Headline per method (FedAMoLE variants highlighted) with its 95 % interval."""
    names = list(result["methods"])
    docs = [result["methods"][n] for n in names]
    means = np.array([d["mean"] for d in docs])
    errors = np.array(
        [[d["mean"] - d["interval"]["low"], d["interval"]["high"] - d["mean"]] for d in docs]
    ).T
    colors = ["tab:orange" if n in FEDAMOLE_VARIANTS else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    ax.bar(names, means, yerr=errors, color=colors, capsize=4)
    ax.set(
        ylabel=f"test {result['metric']}",
        title=f"validation-selected round; 95 % intervals; seeds {result['seeds']}",
    )
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path: Path, result: dict[str, Any]) -> None:
    """Every method's mean test metric per round, in one plot."""
    fig, ax = plt.subplots(figsize=(8.5, 4))
    colors = plt.get_cmap("tab20").colors  # up to 20 methods, each its own colour
    for i, (name, curve) in enumerate(result["curves"].items()):
        style = "-" if name in FEDAMOLE_VARIANTS else "--"
        ax.plot(range(len(curve)), curve, style, marker="o", label=name, color=colors[i % 20])
    ax.set(xlabel="round", ylabel=f"mean test {result['metric']}", title="per-round test metric")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(out: Path, result: dict[str, Any]) -> None:
    atomic_write_text(out / SUMMARY, json.dumps(result, indent=2))
    atomic_write_text(out / TABLE, render_table(result))
    atomic_write_text(out / REPORT, render_report(result))
    plot_comparison(out / PLOT, result)
    plot_curves(out / CURVES, result)
