"""In-process federation: one process, one shared frozen backbone, clients in sequence, client
states swapped in and out (SPEC 3). Drives FedAMoLE or any :class:`FederatedMethod` through the
same round, writes every output of a run and checkpoints each round."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedamole.baselines import FedAMoLE, FederatedMethod, get_method
from fedamole.checkpoint import CHECKPOINT, atomic_write_text, load_checkpoint, save_checkpoint
from fedamole.config import Config, load_config
from fedamole.data.pipeline import encode_client, prepare_client_splits
from fedamole.data.prompts import build_prompter
from fedamole.federation.server import ServerState
from fedamole.federation.types import (
    ClientUpdate,
    StateDict,
    payload_nbytes,
    update_nbytes,
)
from fedamole.personalised import CONFIG_FILE
from fedamole.reporting import (
    metric_records,
    plot_run,
    read_metrics,
    summarise,
    write_metrics,
    write_summary,
)

log = logging.getLogger("fedamole.simulation")

METHOD_FILE = "method.json"
PRIVATE = "private/"  # checkpoint keys of the clients' private states


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


def resolve_method(method: FederatedMethod | str | None, cfg: Config) -> FederatedMethod:
    """A method object from a name; None means FedAMoLE as the config's ``rsea.mode`` says."""
    if method is None:
        return FedAMoLE.for_config(cfg)
    return get_method(method) if isinstance(method, str) else method


def run_method(run_dir: Path, cfg: Config) -> str:
    """The method a run directory was made with (runs from before methods existed: FedAMoLE)."""
    path = run_dir / METHOD_FILE
    if path.is_file():
        return json.loads(path.read_text())["method"]
    return FedAMoLE.for_config(cfg).name


def check_run_method(run_dir: Path, cfg: Config, method: str) -> None:
    """On resume, refuse to continue a run of another method."""
    saved = run_method(run_dir, cfg)
    if saved != method:
        raise RunDirError(
            f"--resume: {run_dir} is a {saved!r} run, not {method!r}; resume it with its method"
        )


def run_simulation(
    cfg: Config,
    resume: bool = False,
    console: Console | None = None,
    method: FederatedMethod | str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated method in this process (default: FedAMoLE as configured);
    returns the summary written to summary.json."""
    console = console or Console()
    started = time.perf_counter()
    method = resolve_method(method, cfg)
    cfg = method.configure(cfg)
    method.check(cfg)
    splits = prepare_client_splits(cfg)
    run_dir = check_run_dir(cfg, resume)
    if resume:
        check_run_method(run_dir, cfg, method.name)
    handle, tokenizer = method.build(cfg)
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    clients = [
        method.runtime(
            handle, tokenizer, cfg, encode_client(cid, s, prompter, cfg.model.max_length)
        )
        for cid, s in enumerate(splits)
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / CHECKPOINT).exists():
        state, private, extra = _load_state(run_dir)
        for cid, runtime in enumerate(clients):
            method.restore_private_state(runtime, private.get(cid, {}))
        records = [r for r in read_metrics(run_dir) if r["round"] < state.round]
        console.print(f"resuming {run_dir} at round {state.round}")
    else:
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
        atomic_write_text(run_dir / METHOD_FILE, json.dumps({"method": method.name}))
        state = method.init_state(cfg, handle)
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
            state, updates = _run_round(method, state, clients, run_dir, records, progress, steps)
            write_metrics(run_dir, records)
            private = {cid: method.private_state(runtime) for cid, runtime in enumerate(clients)}
            _save_state(run_dir, state, private, {"wall_time_s": elapsed()})
            progress.console.print(round_table(state.round - 1, updates))
            progress.advance(rounds)

    summary = {"method": method.name, **summarise(records, elapsed())}
    write_summary(run_dir, summary)
    plot_run(run_dir, records, method.final_architectures(run_dir, len(clients)))
    console.print(summary_table(summary))
    console.print(f"outputs in {run_dir}/ (summary.json, metrics.jsonl, clients/, plots/)")
    return summary


def _save_state(
    run_dir: Path, state: ServerState, private: dict[int, StateDict], extra: dict[str, Any]
) -> None:
    """One atomic checkpoint of the server state and every client's private state (kept under
    ``private/<client>/`` beside the server's store)."""
    folded = {
        f"{PRIVATE}{cid}/{key}": value
        for cid, tensors in private.items()
        for key, value in tensors.items()
    }
    save_checkpoint(run_dir, replace(state, store={**state.store, **folded}), extra)


def _load_state(run_dir: Path) -> tuple[ServerState, dict[int, StateDict], dict[str, Any]]:
    state, extra = load_checkpoint(run_dir)
    store: StateDict = {}
    private: dict[int, StateDict] = {}
    for key, value in state.store.items():
        if key.startswith(PRIVATE):
            cid, name = key.removeprefix(PRIVATE).split("/", 1)
            private.setdefault(int(cid), {})[name] = value
        else:
            store[key] = value
    return replace(state, store=store), private, extra


def _run_round(
    method: FederatedMethod,
    state: ServerState,
    clients: list[Any],
    run_dir: Path,
    records: list[dict],
    progress: Progress,
    steps_task,
) -> tuple[ServerState, list[ClientUpdate]]:
    """Every client trains in sequence on the shared backbone, the server completes the round,
    models that exist only after aggregation are evaluated; the last round saves client models."""
    cfg = clients[0].cfg
    method.start_round(run_dir, state)
    payloads, updates = [], []
    for runtime in clients:
        cid = runtime.data.client_id
        payload = method.payload(state, cid)
        progress.reset(
            steps_task,
            total=cfg.federation.local_steps,
            description=f"round {state.round} client {cid}",
            info="",
        )
        update = method.client_round(
            payload,
            runtime,
            on_step=lambda step, loss: progress.update(
                steps_task, completed=step, info=f"loss {loss:.3f}"
            ),
        )
        payloads.append(payload)
        updates.append(update)
    new_state = method.complete_round(cfg, state, updates)
    for payload, update, runtime in zip(payloads, updates, clients, strict=True):
        update.metrics.update(method.evaluate_after_round(new_state, runtime))
        records += metric_records(
            state.round,
            update.client_id,
            update.metrics,
            update_nbytes(update),
            payload_nbytes(payload),
        )
        if state.round == cfg.federation.rounds - 1:
            method.save_client(run_dir, new_state, payload, update, runtime)
    return new_state, updates
