"""Evaluation: metrics on hand-known values; generation and choice scoring on the tiny model."""

from __future__ import annotations

import pytest
import torch

from fedamole.config import EvalConfig
from fedamole.data.example import DataError, Example
from fedamole.data.prompts import render_prompt
from fedamole.data.tokenize import encode_pair
from fedamole.evaluation import (
    choice_accuracy,
    choice_losses,
    evaluate_examples,
    exact_match,
    generate,
    primary_metric,
    rouge_l,
)
from fedamole.models import load_base_model

CHOICE_EXAMPLES = [
    Example("Is it even?", str(n), ("even", "odd")[n % 2], "parity", ("even", "odd"))
    for n in (4, 17, 250)
] + [
    Example("Topic?", text, topic, "topic", ("food", "sports", "weather"))
    for text, topic in (
        ("It rained.", "weather"),
        ("We ate soup.", "food"),
        ("He scored a goal in the final minute.", "sports"),
    )
]
GENERATION_EXAMPLES = [
    Example("Reverse the word.", word, word[::-1], "reverse") for word in ("abc", "kenuru", "x")
]


@pytest.fixture(scope="module")
def tiny():
    """Tiny random Llama with larger random weights, so that outputs and losses vary by input.

    (At the default init it emits the same byte for every prompt, which would make batch
    invariance and choice tests pass trivially.)
    """
    model, tokenizer = load_base_model("tiny-random-llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model, tokenizer


def test_rouge_l_hand_values() -> None:
    predictions = ["the cat sat on the mat", "The Cat!", "dog"]
    references = ["the cat is on the mat", "the cat", "bird"]
    # LCS "the cat on the mat" = 5 of 6 tokens each side -> F1 5/6; case/punctuation ignored -> 1
    assert rouge_l(predictions, references) == pytest.approx((5 / 6 + 1 + 0) / 3)
    assert rouge_l(["a b c d"], ["a b"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # P 1/2, R 1


def test_exact_match_normalisation() -> None:
    predictions = ["  Paris. ", "new   york", "42!", "4 2", "Entailment"]
    references = ["paris", "New York", "42", "42", "neutral"]
    assert exact_match(predictions, references) == pytest.approx(3 / 5)


def test_metrics_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="as many predictions as references"):
        rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        exact_match([], [])


def test_generate_batch_size_invariant_and_restores_state(tiny) -> None:
    model, tokenizer = tiny
    model.train()
    prompts = [render_prompt(ex) for ex in CHOICE_EXAMPLES + GENERATION_EXAMPLES]
    one_by_one = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert all(isinstance(text, str) for text in batched)
    assert len(set(one_by_one)) > 1  # the scaled model's outputs depend on the prompt
    assert batched == one_by_one
    assert model.training and tokenizer.padding_side == "right"
    model.eval()


def _hand_choice_losses(model, tokenizer, example: Example) -> list[float]:
    """One unpadded forward per choice; HF's loss is the mean NLL over the labelled tokens."""
    losses = []
    for choice in example.choices:
        encoded = encode_pair(tokenizer, render_prompt(example), choice)
        ids = torch.tensor([encoded["input_ids"]])
        losses.append(model(input_ids=ids, labels=torch.tensor([encoded["labels"]])).loss.item())
    return losses


def test_choice_accuracy_matches_hand_loop(tiny) -> None:
    model, tokenizer = tiny
    with torch.no_grad():
        hand = [_hand_choice_losses(model, tokenizer, ex) for ex in CHOICE_EXAMPLES]
    batched = choice_losses(model, tokenizer, CHOICE_EXAMPLES, batch_size=4)
    for hand_row, batched_row in zip(hand, batched, strict=True):
        assert batched_row == pytest.approx(hand_row, rel=1e-4)
    hits = [
        ex.choices[row.index(min(row))] == ex.output
        for ex, row in zip(CHOICE_EXAMPLES, hand, strict=True)
    ]
    assert choice_accuracy(model, tokenizer, CHOICE_EXAMPLES, batch_size=3) == sum(hits) / 6


def test_evaluate_examples_picks_metrics_by_task_type(tiny) -> None:
    model, tokenizer = tiny
    cfg = EvalConfig(max_new_tokens=4, batch_size=2)
    classification = evaluate_examples(model, tokenizer, CHOICE_EXAMPLES, cfg, max_length=512)
    generation = evaluate_examples(model, tokenizer, GENERATION_EXAMPLES, cfg, max_length=512)
    assert set(classification) == {"accuracy", "num_examples"}
    assert set(generation) == {"rougeL", "exact_match", "num_examples"}
    assert primary_metric(classification) == ("accuracy", classification["accuracy"])
    assert primary_metric(generation) == ("rougeL", generation["rougeL"])


def test_evaluate_examples_skips_over_long(tiny) -> None:
    model, tokenizer = tiny
    cfg = EvalConfig(max_new_tokens=2, batch_size=2)
    short = len(encode_pair(tokenizer, render_prompt(GENERATION_EXAMPLES[2]), "x")["input_ids"])
    metrics = evaluate_examples(model, tokenizer, GENERATION_EXAMPLES, cfg, max_length=short)
    assert metrics["num_examples"] == 1
    with pytest.raises(DataError, match="model.max_length=5"):
        evaluate_examples(model, tokenizer, GENERATION_EXAMPLES, cfg, max_length=5)
