"""In-process federation: one process, one shared frozen backbone, clients in sequence, client
states swapped in and out (SPEC 3). The transport calls the client jobs directly; the round loop
is the engine's (:mod:`fedamole.federation.engine`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from torch import nn

from fedamole.config import Config
from fedamole.data.pipeline import TaskSplits
from fedamole.data.prompts import Prompter, build_prompter
from fedamole.device import autocast, model_device
from fedamole.evaluation import SplitScores, evaluate_examples, split_metrics
from fedamole.federation.client import evaluate_job, train_job
from fedamole.federation.engine import Engine
from fedamole.federation.method import ClientRuntime, FederatedMethod, build_base_model
from fedamole.transports.setup import build_clients, open_run
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    StateDict,
    of_split,
)


class InProcessTransport:
    """Every client lives in this process, on the one shared model handle."""

    def __init__(
        self, method: FederatedMethod, clients: list[ClientRuntime], progress: Progress
    ) -> None:
        self.method = method
        self.clients = {runtime.data.client_id: runtime for runtime in clients}
        self.progress = progress
        self.rounds: TaskID = progress.add_task(
            "rounds", total=clients[0].cfg.federation.rounds, info=""
        )
        self.steps: TaskID = progress.add_task("local steps", total=1, info="")

    def connect(self) -> None:
        """Nothing to wait for."""

    def train(self, round_idx: int, payloads: dict[int, ClientPayload]) -> dict[int, ClientUpdate]:
        self.progress.update(self.rounds, completed=round_idx)
        updates = {}
        for c, payload in payloads.items():
            runtime = self.clients[c]
            self.progress.reset(
                self.steps,
                total=runtime.cfg.federation.local_steps,
                description=f"round {round_idx} client {c}",
                info="",
            )
            updates[c] = train_job(self.method, payload, runtime, self._show_step)
        self.progress.update(self.rounds, completed=round_idx + 1)
        return updates

    def _show_step(self, step: int, loss: float) -> None:
        self.progress.update(self.steps, completed=step, info=f"loss {loss:.3f}")

    def evaluate(
        self, round_idx: int, payloads: dict[int, ClientPayload]
    ) -> dict[int, ClientEvaluation]:
        return {c: evaluate_job(self.method, p, self.clients[c]) for c, p in payloads.items()}

    def client_states(self) -> dict[int, StateDict]:
        """The clients' private tensors live here, so they are checkpointed with the server."""
        return {c: runtime.private for c, runtime in self.clients.items()}

    def restore_client_states(self, states: dict[int, StateDict]) -> None:
        for c, runtime in self.clients.items():
            if c in states:
                runtime.private = states[c]


def base_model_scores(cfg: Config, splits: list[TaskSplits]) -> dict[int, Metrics]:
    """The frozen base model (no adapter) on every client's test split, in the run's prompt
    format: the reference a personalised model must beat. Built and freed before the run's
    model, so peak memory does not grow."""
    model, tokenizer = build_base_model(cfg)
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    with autocast(model_device(model), cfg.optim.mixed_precision):
        return {
            c: of_split(split_metrics({"test": _test_scores(model, prompter, cfg, task)}), "test")
            for c, task in enumerate(splits)
        }


def _test_scores(
    model: nn.Module, prompter: Prompter, cfg: Config, task: TaskSplits
) -> SplitScores:
    return evaluate_examples(
        model,
        prompter,
        task.splits.test,
        cfg.eval,
        cfg.model.max_length,
        classification=task.classification,
    )


@contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        yield progress


def run_in_process(
    cfg: Config,
    resume: bool = False,
    console: Console | None = None,
    method: FederatedMethod | str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated method in this process (default: FedAMoLE as the config's
    ``rsea.mode`` says); returns the summary written to summary.json. Every check that can fail
    (device, settings, run directory, data) runs before the model loads."""
    console = console or Console()
    setup = open_run(cfg, method, resume, with_data=True)
    base = base_model_scores(setup.cfg, setup.splits or []) if setup.cfg.eval.base_model else {}
    handle, clients = build_clients(setup)
    cfg, method = setup.cfg, setup.method
    with _progress(console) as progress:
        transport = InProcessTransport(method, clients, progress)
        engine = Engine(cfg, method, transport, setup.run_dir, progress.console, base)
        return engine.run(lambda first: method.init_state(cfg, handle, first), resume)
