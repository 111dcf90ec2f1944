"""The client's side of a round, for any transport: run the method's training or evaluation job
on this client, put what travels in the wire dtype, and in the last round hand back the
personalised model the client was evaluated with."""

from __future__ import annotations

from fedamole.federation.method import ClientRuntime, FederatedMethod, H
from fedamole.federation.training import StepCallback
from fedamole.types import ClientEvaluation, ClientPayload, ClientUpdate, to_wire


def is_last_round(runtime: ClientRuntime, round_idx: int) -> bool:
    return round_idx == runtime.cfg.federation.rounds - 1


def train_job(
    method: FederatedMethod[H],
    payload: ClientPayload,
    runtime: ClientRuntime[H],
    on_step: StepCallback | None = None,
) -> ClientUpdate:
    """Local training (SPEC 3.2-3.4) and the upload in the wire dtype."""
    update = method.client_round(payload, runtime, on_step)
    update.weights = to_wire(update.weights, runtime.cfg.federation.wire_dtype)
    if is_last_round(runtime, payload.round) and not method.evaluates_after_aggregation:
        update.personal_model = method.personal_model(runtime)
    return update


def evaluate_job(
    method: FederatedMethod[H], payload: ClientPayload, runtime: ClientRuntime[H]
) -> ClientEvaluation:
    """Evaluation of the model built from the aggregated state (methods that serve it)."""
    evaluation = method.evaluate(payload, runtime)
    if is_last_round(runtime, payload.round):
        evaluation.personal_model = method.personal_model(runtime)
    return evaluation
