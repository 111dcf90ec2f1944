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

from fedamole.config import Config
from fedamole.federation.client import base_model_scores, evaluate_job, train_job
from fedamole.federation.engine import Engine
from fedamole.federation.method import ClientRuntime, FederatedMethod
from fedamole.transports.setup import build_clients, open_run
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    StateDict,
)


class InProcessTransport:
    """Every client lives in this process, on the one shared model handle."""

    def __init__(
        self,
        method: FederatedMethod,
        clients: list[ClientRuntime],
        progress: Progress,
        base_scores: dict[int, Metrics],
    ) -> None:
        self.method = method
        self._base_scores = base_scores
        self.clients = {runtime.data.client_id: runtime for runtime in clients}
        self.progress = progress
        self.rounds: TaskID = progress.add_task(
            "rounds", total=clients[0].cfg.federation.rounds, info=""
        )
        self.steps: TaskID = progress.add_task("local steps", total=1, info="")

    def connect(self) -> None:
        """Nothing to wait for."""

    def base_scores(self) -> dict[int, Metrics]:
        """Scored before the clients' model was built (:func:`run_in_process`), so that the two
        backbones are never in memory at once."""
        return self._base_scores

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
    splits = dict(enumerate(setup.splits or []))
    base = base_model_scores(setup.cfg, splits) if setup.cfg.eval.base_model else {}
    handle, clients = build_clients(setup)
    cfg, method = setup.cfg, setup.method
    with _progress(console) as progress:
        transport = InProcessTransport(method, clients, progress, base)
        engine = Engine(cfg, method, transport, setup.run_dir, progress.console)
        return engine.run(lambda first: method.init_state(cfg, handle, first), resume)
