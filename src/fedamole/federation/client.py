"""The client's side of a round, for any transport: run the method's training or evaluation job
on this client, put what travels in the wire dtype, and in the last round hand back the
personalised model the client was evaluated with."""

from __future__ import annotations

from collections.abc import Mapping

from fedamole.config import Config
from fedamole.data.pipeline import TaskSplits
from fedamole.data.prompts import build_prompter
from fedamole.device import autocast, model_device
from fedamole.evaluation import evaluate_examples, split_metrics
from fedamole.federation.method import ClientRuntime, FederatedMethod, H, build_base_model
from fedamole.federation.training import StepCallback
from fedamole.types import ClientEvaluation, ClientPayload, ClientUpdate, Metrics, of_split, to_wire


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


def base_model_scores(cfg: Config, splits: Mapping[int, TaskSplits]) -> dict[int, Metrics]:
    """The frozen base model (no adapter) on each given client's test split, in the run's prompt
    format: the reference a personalised model must beat (``eval.base_model``). Its own model,
    built here and freed on return; wherever the clients' data live, this runs there."""
    model, tokenizer = build_base_model(cfg)
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    scores = {}
    with autocast(model_device(model), cfg.optim.mixed_precision):
        for c, task in splits.items():
            test = evaluate_examples(
                model,
                prompter,
                task.splits.test,
                cfg.eval,
                cfg.model.max_length,
                classification=task.classification,
            )
            scores[c] = of_split(split_metrics({"test": test}), "test")
    return scores
