"""Per-client evaluation as in the paper: ROUGE-L F1 on greedy generations for open-ended tasks,
accuracy by lowest mean token loss over the answer choices for classification.

All metrics are fractions in [0, 1] (ROUGE-L is not multiplied by 100).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedamole.config import EvalConfig
from fedamole.data.example import DataError, Example
from fedamole.data.prompts import render_prompt
from fedamole.data.tokenize import IGNORE_INDEX, collate, encode_example, encode_pair

log = logging.getLogger("fedamole.evaluation")

_TRAILING_PUNCTUATION = ".,;:!?"


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references, at least one; got "
            f"{len(predictions)} and {len(references)}"
        )


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 in [0, 1] (rouge-score tokenising: lower case, alphanumeric, unstemmed)."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: trim, casefold, collapse spaces, drop final punctuation."""
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalize_answer`."""
    _check_pairs(predictions, references)
    hits = [
        normalize_answer(prediction) == normalize_answer(reference)
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    return sum(hits) / len(hits)


@contextmanager
def _inference(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; every module's own training flag is restored."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _padding_side(tokenizer: PreTrainedTokenizerBase, side: str) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Continuations of `prompts` (new text only): greedy, or sampled with `temperature` and
    nucleus `top_p` when `do_sample` (seed torch's generator first for repeatable samples).

    Prompts are left-padded so every continuation starts right after its prompt. Generation
    stops at the tokenizer's eos, the token training appends to every response (a model's
    generation_config may name another one).
    """
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    eos_id = tokenizer.eos_token_id
    outputs: list[str] = []
    with _inference(model), _padding_side(tokenizer, "left"):
        for batch in _batches(prompts, batch_size):
            encoded = tokenizer(list(batch), return_tensors="pt", padding=True).to(_device(model))
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                **sampling,
                eos_token_id=eos_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :].tolist()
            outputs.extend(
                tokenizer.decode(_until_eos(ids, eos_id), skip_special_tokens=True).strip()
                for ids in new_tokens
            )
    return outputs


def _mean_token_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over each sequence's labelled tokens (one value per sequence)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return nll.sum(dim=1) / counts


@torch.no_grad()
def choice_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
) -> list[list[float]]:
    """Per example, the mean token loss of each choice as the response (choice tokens + eos).

    The eos is scored too because training ends every response with it: it separates a choice
    from longer continuations that merely start with it.
    """
    pairs = [
        encode_pair(tokenizer, render_prompt(example), choice)
        for example in examples
        for choice in _choices(example)
    ]
    losses: list[float] = []
    with _inference(model):
        for batch in _batches(pairs, batch_size):
            tensors = collate(batch, tokenizer.pad_token_id)
            tensors = {key: value.to(_device(model)) for key, value in tensors.items()}
            losses.extend(_mean_token_loss(model, tensors).tolist())
    per_example, start = [], 0
    for example in examples:
        per_example.append(losses[start : start + len(_choices(example))])
        start += len(_choices(example))
    return per_example


def _choices(example: Example) -> tuple[str, ...]:
    if not example.choices:
        raise ValueError(f"example with label {example.label!r} has no answer choices")
    return example.choices


def choice_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
) -> float:
    """Share of examples whose lowest-loss choice equals the reference output."""
    losses = choice_losses(model, tokenizer, examples, batch_size)
    hits = [
        normalize_answer(_choices(example)[row.index(min(row))]) == normalize_answer(example.output)
        for example, row in zip(examples, losses, strict=True)
    ]
    return sum(hits) / len(hits)


def evaluate_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    cfg: EvalConfig,
    max_length: int,
) -> dict[str, float]:
    """{"accuracy"} when every example has choices, else {"rougeL", "exact_match"}; both with
    "num_examples". Examples longer than `max_length` are skipped, as they are in training."""
    kept = [
        example
        for example in examples
        if encode_example(tokenizer, example, max_length) is not None
    ]
    if not kept:
        raise DataError(
            f"none of {len(examples)} evaluation examples fits in model.max_length={max_length}"
        )
    if len(kept) < len(examples):
        log.warning(
            "evaluation skipped %d of %d examples longer than model.max_length=%d",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
    metrics: dict[str, float] = {"num_examples": float(len(kept))}
    if all(example.choices for example in kept):
        metrics["accuracy"] = choice_accuracy(model, tokenizer, kept, cfg.batch_size)
        return metrics
    prompts = [render_prompt(example) for example in kept]
    predictions = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    references = [example.output for example in kept]
    metrics["rougeL"] = rouge_l(predictions, references)
    metrics["exact_match"] = exact_match(predictions, references)
    return metrics


def primary_metric(metrics: dict[str, float]) -> tuple[str, float]:
    """The metric used for model selection: accuracy for classification, else ROUGE-L."""
    name = "accuracy" if "accuracy" in metrics else "rougeL"
    return name, metrics[name]
