"""THE round loop, for every method and every transport.

The engine sets up or resumes a run, and each round: picks the participants, builds their
payloads, has the transport run the clients' training, lets the method complete the round
(aggregation, re-assignment), has the transport evaluate the aggregated model where the method
serves it, records metrics and bytes, checkpoints, and after the last round writes the clients'
personalised models, the summary and the plots. How messages travel is the transport's business:
in this process (:mod:`fedamole.transports.in_process`) or over Flower
(:mod:`fedamole.transports.flower`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from rich.console import Console

from fedamole.checkpoint import Checkpoint
from fedamole.config import Config
from fedamole.federation.manifest import round_manifest
from fedamole.federation.method import FederatedMethod
from fedamole.federation.participation import participants
from fedamole.reporting import (
    Record,
    RunDir,
    example_score_rows,
    metric_records,
    round_table,
    server_record,
    summarise,
    summary_table,
)
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    ServerState,
    StateDict,
    of_split,
    payload_nbytes,
    primary_metric,
    split_metric,
    to_wire,
    update_nbytes,
)

log = logging.getLogger("fedamole.engine")


class Transport(Protocol):
    """How the engine reaches the clients. A client missing from a reply dict dropped out of
    that step (the transport logs why); the round goes on with the others."""

    def connect(self) -> None:
        """Get ready before the first round (Flower: wait for the organisations' nodes)."""
        ...

    def train(self, round_idx: int, payloads: dict[int, ClientPayload]) -> dict[int, ClientUpdate]:
        """Each addressed client trains on its payload; their updates by client id."""
        ...

    def evaluate(
        self, round_idx: int, payloads: dict[int, ClientPayload]
    ) -> dict[int, ClientEvaluation]:
        """Each addressed client evaluates the model built from its payload."""
        ...

    def client_states(self) -> dict[int, StateDict]:
        """Private client tensors to checkpoint with the server state ({} when the clients keep
        them on their own machines)."""
        ...

    def base_scores(self) -> dict[int, Metrics]:
        """The frozen base model's test metrics per client, scored where each client's data
        are (asked once per run when ``eval.base_model`` is set)."""
        ...

    def restore_client_states(self, states: dict[int, StateDict]) -> None: ...


StateFactory = Callable[[list[int]], ServerState]


@dataclass
class Engine:
    """One run of ``method`` over ``transport``, recorded in ``run_dir``."""

    cfg: Config
    method: FederatedMethod
    transport: Transport
    run_dir: RunDir
    console: Console = field(default_factory=Console)

    def run(self, initial_state: StateFactory, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) every round; returns the summary written to summary.json. The run
        directory's lock is given up however the run ends."""
        try:
            return self._run(initial_state, resume)
        finally:
            self.run_dir.release()

    def _run(self, initial_state: StateFactory, resume: bool) -> dict[str, Any]:
        started = time.perf_counter()
        state, previous_time = self._start(initial_state, resume)
        self.run_dir.start_tracking(
            self.cfg, f"{self.method.name}:{self.run_dir.path.name}", state.round or None
        )
        self.transport.connect()
        # the frozen base model's test metrics, shown beside the personalised ones
        base_scores = self.transport.base_scores() if self.cfg.eval.base_model else {}

        def elapsed() -> float:
            return previous_time + time.perf_counter() - started

        while state.round < self.cfg.federation.rounds:
            state = self._round(state)
            checkpoint = Checkpoint(state, self.transport.client_states(), elapsed())
            self.run_dir.save_checkpoint(checkpoint)
        records = self.run_dir.read_records()  # each round appended its own; none kept here
        summary = {
            "method": self.method.name,
            **self.method.notes(),
            **summarise(records, elapsed()),
        }
        if base_scores:
            summary["base_model"] = {str(c): m for c, m in sorted(base_scores.items())}
        self.run_dir.write_summary(summary)
        self.run_dir.finish_tracking()
        self.run_dir.write_plots(records, self.run_dir.latest_architectures())
        self.console.print(summary_table(summary))
        self.console.print(
            f"outputs in {self.run_dir.path}/ (summary.json, metrics.jsonl, clients/)"
        )
        return summary

    def _start(self, initial_state: StateFactory, resume: bool) -> tuple[ServerState, float]:
        if resume and self.run_dir.has_checkpoint:
            checkpoint = self.run_dir.load_checkpoint()
            self.transport.restore_client_states(checkpoint.client_states)
            self.run_dir.rewind(checkpoint.state.round)
            self.console.print(f"resuming {self.run_dir.path} at round {checkpoint.state.round}")
            return checkpoint.state, checkpoint.wall_time_s
        if resume:  # killed before round 0's checkpoint: drop what that round wrote
            self.run_dir.rewind(0)
        else:
            self.run_dir.start(self.cfg, self.method.name)
        return initial_state(participants(self.cfg, 0)), 0.0

    def _payload(self, state: ServerState, client_id: int) -> ClientPayload:
        payload = self.method.payload(state, client_id)
        return replace(payload, weights=to_wire(payload.weights, self.cfg.federation.wire_dtype))

    def _round(self, state: ServerState) -> ServerState:
        """One round: train, complete, evaluate after aggregation if the method says so, record."""
        round_idx = state.round
        architectures = self.method.architectures(state)
        if architectures:
            self.run_dir.write_assignment(round_idx, architectures)
        payloads = {c: self._payload(state, c) for c in state.participants}
        updates = self.transport.train(round_idx, payloads)
        next_state, diagnostics = self.method.complete_round(
            self.cfg,
            state,
            [updates[c] for c in sorted(updates)],
            participants(self.cfg, round_idx + 1),
        )
        evaluations: dict[int, ClientEvaluation] = {}
        eval_bytes: dict[int, int] = {}
        eval_payloads: dict[int, ClientPayload] = {}
        if self.method.evaluates_after_aggregation and updates:
            eval_payloads = {
                c: replace(self._payload(next_state, c), round=round_idx) for c in sorted(updates)
            }
            eval_bytes = {c: payload_nbytes(p) for c, p in eval_payloads.items()}
            evaluations = self.transport.evaluate(round_idx, eval_payloads)
        self.run_dir.write_manifest(
            round_idx,
            round_manifest(payloads, eval_payloads, updates, self.cfg.privacy.enabled),
        )
        self._record(round_idx, payloads, updates, evaluations, eval_bytes, diagnostics)
        if round_idx == self.cfg.federation.rounds - 1:
            self._save_client_models(round_idx, payloads, updates, evaluations)
        return next_state

    def _record(
        self,
        round_idx: int,
        payloads: dict[int, ClientPayload],
        updates: dict[int, ClientUpdate],
        evaluations: dict[int, ClientEvaluation],
        eval_bytes: dict[int, int],
        diagnostics: Metrics,
    ) -> None:
        """Metrics and bytes per client that completed the round, and the server's record,
        appended to the run's files."""
        completed: dict[int, Metrics] = {}
        records: list[Record] = []
        example_scores: list[Record] = []
        for c, update in sorted(updates.items()):
            metrics, scores = dict(update.metrics), dict(update.example_scores)
            if self.method.evaluates_after_aggregation:
                if c not in evaluations:
                    log.warning("round %d: client %d trained but was not evaluated", round_idx, c)
                    continue
                metrics |= evaluations[c].metrics
                scores |= evaluations[c].example_scores
            down = payload_nbytes(payloads[c]) + eval_bytes.get(c, 0)
            records += metric_records(round_idx, c, metrics, update_nbytes(update), down)
            example_scores += example_score_rows(round_idx, c, scores)
            completed[c] = metrics
        records += server_record(round_idx, diagnostics)
        self.run_dir.append_round(records, example_scores)
        self.run_dir.track_round(round_idx, records)
        if completed:
            self.console.print(round_table(round_idx, completed))

    def _save_client_models(
        self,
        round_idx: int,
        payloads: dict[int, ClientPayload],
        updates: dict[int, ClientUpdate],
        evaluations: dict[int, ClientEvaluation],
    ) -> None:
        """Each client's personalised model after the last round, with how to rebuild it. A model
        that never leaves the client's machine is noted, not written."""
        replies = evaluations if self.method.evaluates_after_aggregation else updates
        for c, reply in sorted(replies.items()):
            test = of_split(reply.metrics, "test")
            if not test:
                continue
            metric = split_metric("test", primary_metric(test))
            doc = {
                "client": c,
                "method": self.method.name,
                "round": round_idx,
                **self.method.describe(self.cfg, payloads[c]),
                metric: reply.metrics[metric],
            }
            if reply.personal_model is None:
                doc["weights"] = "kept on the client's own node (it holds private tensors)"
                if reply.kept_at is not None:
                    doc["kept_at"] = reply.kept_at  # the folder on that node, as it reported
            self.run_dir.save_client_model(
                c, reply.personal_model, self.method.client_model_file, doc
            )
