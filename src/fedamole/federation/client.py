"""The client's side of a round, for any transport: run the method's training or evaluation job
on this client, put what travels in the wire dtype, and in the last round hand back the
personalised model the client was evaluated with; and how a client's model is scored on its
splits, answering as its method says (:func:`evaluate_client`, which methods call)."""

from __future__ import annotations

from collections.abc import Mapping

from fedamole.config import Config
from fedamole.data.example import Example
from fedamole.data.pipeline import TaskSplits
from fedamole.data.prompts import build_prompter
from fedamole.device import autocast, model_device
from fedamole.evaluation import (
    SplitScores,
    evaluate_examples,
    fitting_indices,
    score_examples,
    split_metric_names,
    split_metrics,
)
from fedamole.federation.method import ClientRuntime, FederatedMethod, H
from fedamole.federation.training import StepCallback
from fedamole.models import build_base_model
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    ExampleScores,
    Metrics,
    of_split,
    split_metric,
    to_wire,
)


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


def score_split(
    method: FederatedMethod[H], runtime: ClientRuntime[H], examples: list[Example]
) -> SplitScores:
    """The client's model as its method answers (:meth:`FederatedMethod.answer_groups`) on one
    split; examples too long for the model are skipped, as in training."""
    cfg, data = runtime.cfg, runtime.data
    indices = fitting_indices(data.prompter, examples, cfg.model.max_length)
    kept = [examples[i] for i in indices]
    names = split_metric_names(data.classification)
    values = {name: [0.0] * len(kept) for name in names}
    for context, members in method.answer_groups(runtime, kept):
        with context:
            scores = score_examples(
                runtime.handle.model,
                data.prompter,
                [kept[i] for i in members],
                cfg.eval,
                classification=data.classification,
            )
        for name in names:
            for i, value in zip(members, scores[name], strict=True):
                values[name][i] = value
    return SplitScores(data.classification, values, indices)


def evaluate_client(
    method: FederatedMethod[H], runtime: ClientRuntime[H]
) -> tuple[Metrics, ExampleScores]:
    """The client's current model on its validation and test splits, as ``val_*``/``test_*``
    means and per-example scores (in the split's order, so runs on the same data pair up),
    under the configured mixed precision."""
    model = runtime.handle.model
    with autocast(model_device(model), runtime.cfg.optim.mixed_precision):
        scores = {
            split: score_split(method, runtime, getattr(runtime.data.splits, split))
            for split in ("val", "test")
        }
    per_example = {
        split_metric(split, name): values
        for split, split_scores in scores.items()
        for name, values in split_scores.values.items()
    }
    return split_metrics(scores), per_example
