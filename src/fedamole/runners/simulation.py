"""In-process FedAMoLE: one process, one shared frozen backbone, clients in sequence, client expert
states swapped in and out (SPEC 3). Writes every output of a run and checkpoints each round."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedamole.checkpoint import CHECKPOINT, atomic_write_text, load_checkpoint, save_checkpoint
from fedamole.config import Config, load_config
from fedamole.data.pipeline import encode_client, prepare_client_splits
from fedamole.federation.client import ClientRuntime, run_client_round
from fedamole.federation.server import (
    ServerState,
    check_assignment_settings,
    client_payload,
    complete_round,
    init_server_state,
)
from fedamole.federation.types import ClientPayload, ClientUpdate, payload_nbytes, update_nbytes
from fedamole.personalised import CONFIG_FILE, build_hmole_model
from fedamole.reporting import (
    metric_records,
    plot_run,
    primary_name,
    read_metrics,
    save_client_adapter,
    summarise,
    write_assignment,
    write_metrics,
    write_summary,
)

log = logging.getLogger("fedamole.simulation")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; nothing in it was touched."""


def check_run_dir(cfg: Config, resume: bool) -> Path:
    """Refuse to overwrite an existing run; on resume, require its config to match ours."""
    run_dir = Path(cfg.output.dir)
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunDirError(
                f"run directory {run_dir} already exists and is not empty; pass --resume to continue "
                f"it, or choose another --out"
            )
        return run_dir
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(
            f"--resume: {run_dir / CONFIG_FILE} not found; is {run_dir} a fedamole run?"
        )
    saved = load_config(run_dir / CONFIG_FILE).model_dump(mode="json")
    ours = cfg.model_dump(mode="json")
    differing = [
        f"{section}.{key}"
        for section, values in ours.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ] + [k for k, v in ours.items() if not isinstance(v, dict) and saved.get(k) != v]
    if differing:
        raise RunDirError(
            f"--resume: settings differ from the run's {CONFIG_FILE}: {', '.join(differing)}; "
            f"resume with the same configuration"
        )
    return run_dir


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def round_table(round_idx: int, updates: list[ClientUpdate]) -> Table:
    table = Table(title=f"round {round_idx}")
    names = sorted(k for k in updates[0].metrics if k != "train_loss" and "num_examples" not in k)
    for column in ("client", "train_loss", *names):
        table.add_column(column, justify="right")
    for u in updates:
        table.add_row(
            str(u.client_id),
            f"{u.metrics['train_loss']:.3f}",
            *(f"{u.metrics[n]:.3f}" for n in names),
        )
    return table


def summary_table(summary: dict[str, Any]) -> Table:
    metric = summary["metric"]
    table = Table(title=f"final per-client test {metric} (last round / validation-selected round)")
    for column in ("client", "last", "selected", "selected round"):
        table.add_column(column, justify="right")
    for cid, values in summary["per_client"].items():
        table.add_row(
            cid,
            f"{values['last'][metric]:.4f}",
            f"{values['selected'][metric]:.4f}",
            str(values["selected"]["round"]),
        )
    table.add_row(
        "mean",
        f"{summary['mean']['last'][metric]:.4f}",
        f"{summary['mean']['selected'][metric]:.4f}",
        "",
    )
    return table


def run_simulation(
    cfg: Config, resume: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Run (or resume) FedAMoLE in this process; returns the summary written to summary.json."""
    console = console or Console()
    started = time.perf_counter()
    check_assignment_settings(cfg)
    splits = prepare_client_splits(cfg)
    run_dir = check_run_dir(cfg, resume)
    adapter, tokenizer = build_hmole_model(cfg)
    clients = [
        ClientRuntime(
            adapter, tokenizer, cfg, encode_client(cid, s, tokenizer, cfg.model.max_length)
        )
        for cid, s in enumerate(splits)
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / CHECKPOINT).exists():
        state, extra = load_checkpoint(run_dir)
        records = [r for r in read_metrics(run_dir) if r["round"] < state.round]
        console.print(f"resuming {run_dir} at round {state.round}")
    else:
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
        state = init_server_state(
            cfg, adapter.modules, adapter.init_global_state(cfg.hmole.num_experts, cfg.seed)
        )
        extra, records = {"wall_time_s": 0.0}, []
    previous_time = extra["wall_time_s"]

    def elapsed() -> float:
        return previous_time + time.perf_counter() - started

    with _progress(console) as progress:
        rounds = progress.add_task(
            "rounds", total=cfg.federation.rounds, completed=state.round, info=""
        )
        steps = progress.add_task("local steps", total=cfg.federation.local_steps, info="")
        while state.round < cfg.federation.rounds:
            updates = _run_round(state, clients, run_dir, records, progress, steps)
            state = complete_round(cfg, state, updates)
            write_metrics(run_dir, records)
            save_checkpoint(run_dir, state, {"wall_time_s": elapsed()})
            progress.console.print(round_table(state.round - 1, updates))
            progress.advance(rounds)

    summary = summarise(records, elapsed())
    write_summary(run_dir, summary)
    plot_run(run_dir, records, _final_architectures(run_dir, len(clients)))
    console.print(summary_table(summary))
    console.print(f"outputs in {run_dir}/ (summary.json, metrics.jsonl, clients/, plots/)")
    return summary


def _run_round(
    state: ServerState,
    clients: list[ClientRuntime],
    run_dir: Path,
    records: list[dict],
    progress: Progress,
    steps_task,
) -> list[ClientUpdate]:
    """Every client trains in sequence on the shared backbone; the last round saves adapters."""
    cfg = clients[0].cfg
    write_assignment(run_dir, state.round, state.architectures)
    updates = []
    for runtime in clients:
        cid = runtime.data.client_id
        payload = client_payload(state, cid)
        progress.reset(
            steps_task,
            total=cfg.federation.local_steps,
            description=f"round {state.round} client {cid}",
            info="",
        )
        update = run_client_round(
            payload,
            runtime,
            on_step=lambda step, loss: progress.update(
                steps_task, completed=step, info=f"loss {loss:.3f}"
            ),
        )
        updates.append(update)
        records += metric_records(
            state.round, cid, update.metrics, update_nbytes(update), payload_nbytes(payload)
        )
        if state.round == cfg.federation.rounds - 1:
            _save_adapter(run_dir, payload, update, cfg)
    return updates


def _save_adapter(run_dir: Path, payload: ClientPayload, update: ClientUpdate, cfg: Config) -> None:
    metric = primary_name({k.removeprefix("test_"): v for k, v in update.metrics.items()})
    save_client_adapter(
        run_dir,
        update.client_id,
        update.weights,
        payload.architecture,
        {
            "round": payload.round,
            "base_model": cfg.model.name,
            "hmole": cfg.hmole.model_dump(mode="json"),
            "test_" + metric: update.metrics["test_" + metric],
        },
    )


def _final_architectures(run_dir: Path, num_clients: int) -> list[dict[str, list[int]]]:
    return [
        json.loads((run_dir / "clients" / str(c) / "architecture.json").read_text())["architecture"]
        for c in range(num_clients)
    ]
