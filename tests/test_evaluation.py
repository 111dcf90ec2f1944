"""Evaluation: metrics on hand-known values; generation and choice scoring on the tiny model, in
the Alpaca and the chat format; one metric per data set, per-example scores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedamole.config import EvalConfig, load_config
from fedamole.data.example import DataError, Example
from fedamole.data.pipeline import encode_client, prepare_client_splits
from fedamole.data.prompts import build_prompter, render_prompt
from fedamole.evaluation import (
    RougeTokenizer,
    SplitScores,
    choice_hits,
    choice_losses,
    evaluate_examples,
    exact_match_scores,
    generate,
    rouge_l_scores,
    split_metrics,
)
from fedamole.hmole import inject_hmole
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


def _scaled(model: torch.nn.Module) -> torch.nn.Module:
    """Larger random weights, so that outputs and losses vary by input.

    (At the default init the tiny model emits the same byte for every prompt, which would make
    batch invariance and choice tests pass trivially.)
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.fixture(scope="module")
def tiny():
    """Tiny random Llama (scaled) and its Alpaca prompter (the tokenizer has no chat template)."""
    model, tokenizer = load_base_model("tiny-random-llama")
    return _scaled(model), build_prompter(tokenizer)


@pytest.fixture(scope="module")
def chat_tiny(chatml_tokenizer):
    """A scaled tiny Llama resized to the ChatML tokenizer, and its chat prompter."""
    model, _ = load_base_model("tiny-random-llama")
    model.resize_token_embeddings(len(chatml_tokenizer))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return _scaled(model), build_prompter(chatml_tokenizer)


def test_rouge_tokens_keep_signs_punctuation_and_unicode_letters() -> None:
    tokens = RougeTokenizer().tokenize("Hello, World! -3.5 Привет 北京")
    assert tokens == ["hello", ",", "world", "!", "-", "3", ".", "5", "привет", "北", "京"]


def test_rouge_l_hand_values() -> None:
    predictions = ["the cat sat on the mat", "The Cat!", "dog"]
    references = ["the cat is on the mat", "the cat", "bird"]
    # LCS "the cat on the mat" = 5 of 6 tokens each side -> F1 5/6;
    # "the cat !" vs "the cat": P 2/3, R 1 -> F1 2 * (2/3) / (5/3) = 4/5; no overlap -> 0
    assert rouge_l_scores(predictions, references) == pytest.approx([5 / 6, 4 / 5, 0])
    assert rouge_l_scores(["a b c d"], ["a b"]) == pytest.approx([2 * 0.5 * 1 / 1.5])  # P 1/2, R 1


def test_rouge_l_tells_signs_apart_and_scores_non_latin_text() -> None:
    # "28486" vs "- 28486": P 1, R 1/2 -> F1 2/3 (rouge-score's default tokenizer says 1)
    assert rouge_l_scores(["28486"], ["-28486"]) == pytest.approx([2 / 3])
    # one of two words / two of four characters in common: P = R = 1/2 -> F1 1/2
    predictions = ["привет мир", "我爱北京", "Доброе утро", "東京タワー"]
    references = ["привет друг", "我爱上海", "Доброе утро", "東京タワー"]
    assert rouge_l_scores(predictions, references) == pytest.approx([0.5, 0.5, 1, 1])


def test_exact_match_normalisation() -> None:
    predictions = ["  Paris. ", "new   york", "42!", "4 2", "Entailment"]
    references = ["paris", "New York", "42", "42", "neutral"]
    assert exact_match_scores(predictions, references) == [1, 1, 1, 0, 0]


def test_metrics_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="as many predictions as references"):
        rouge_l_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        exact_match_scores([], [])


def test_generate_batch_size_invariant_and_restores_state(tiny) -> None:
    model, prompter = tiny
    model.train()
    examples = CHOICE_EXAMPLES + GENERATION_EXAMPLES
    one_by_one = generate(model, prompter, examples, max_new_tokens=6, batch_size=1)
    batched = generate(model, prompter, examples, max_new_tokens=6, batch_size=4)
    assert all(isinstance(text, str) for text in batched)
    assert len(set(one_by_one)) > 1  # the scaled model's outputs depend on the prompt
    assert batched == one_by_one
    assert model.training and prompter.tokenizer.padding_side == "right"
    model.eval()


def test_chat_generation_stops_at_end_of_turn(chat_tiny) -> None:
    """Make the model emit <|im_end|> mid-answer (its tied embedding becomes a scaled copy of a
    token greedy decoding picks, so it outscores that token), then check the answer is cut there
    while an eos-only generation runs on past it."""
    model, prompter = chat_tiny
    tokenizer = prompter.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    example = GENERATION_EXAMPLES[1]
    prompt = torch.tensor([prompter.prompt_ids(example)])

    def eos_only_continuation() -> list[int]:
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[0, prompt.shape[1] :].tolist()

    third = eos_only_continuation()[2]
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[im_end] = 1.5 * embeddings[third]
    continuation = eos_only_continuation()
    cut = continuation.index(im_end)
    after = tokenizer.decode(continuation[cut:], skip_special_tokens=True).strip()
    assert after, "the eos-only generation should go on past <|im_end|>"
    answer = generate(model, prompter, [example], max_new_tokens=8, batch_size=1)
    assert answer == [tokenizer.decode(continuation[:cut], skip_special_tokens=True).strip()]


def _hand_choice_losses(model, prompter, example: Example) -> list[float]:
    """One unpadded forward per choice on hand-built ids; HF's loss is the mean NLL over the
    labelled tokens: the choice and eos (Alpaca), or the choice and <|im_end|> (ChatML)."""
    tok = prompter.tokenizer
    if prompter.chat:
        user = f"<|im_start|>user\n{example.instruction}\n\n{example.input}<|im_end|>\n"
        prompt = tok(f"{user}<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    else:
        prompt = tok(render_prompt(example))["input_ids"]
    losses = []
    for choice in example.choices:
        if prompter.chat:
            target = tok(f"{choice}<|im_end|>", add_special_tokens=False)["input_ids"]
        else:
            target = [*tok(choice, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        losses.append(model(input_ids=ids, labels=labels).loss.item())
    return losses


@pytest.mark.parametrize("fixture", ["tiny", "chat_tiny"])
def test_choice_scoring_matches_hand_loop(fixture: str, request) -> None:
    model, prompter = request.getfixturevalue(fixture)
    with torch.no_grad():
        hand = [_hand_choice_losses(model, prompter, ex) for ex in CHOICE_EXAMPLES]
    batched = choice_losses(model, prompter, CHOICE_EXAMPLES, batch_size=4)
    for hand_row, batched_row in zip(hand, batched, strict=True):
        assert batched_row == pytest.approx(hand_row, rel=1e-4)
    hits = [
        float(ex.choices[row.index(min(row))] == ex.output)
        for ex, row in zip(CHOICE_EXAMPLES, hand, strict=True)
    ]
    assert choice_hits(model, prompter, CHOICE_EXAMPLES, batch_size=3) == hits


def test_evaluate_examples_scores_per_example_by_the_given_task_type(tiny) -> None:
    model, prompter = tiny
    cfg = EvalConfig(max_new_tokens=4, batch_size=2)
    classification = evaluate_examples(
        model, prompter, CHOICE_EXAMPLES, cfg, max_length=512, classification=True
    )
    assert classification.primary == "accuracy"
    assert classification.example_indices == list(range(len(CHOICE_EXAMPLES)))
    assert classification.values == {"accuracy": choice_hits(model, prompter, CHOICE_EXAMPLES, 6)}
    assert classification.means() == {
        "num_examples": 6.0,
        "accuracy": pytest.approx(sum(classification.values["accuracy"]) / 6),
    }
    # the same examples as generation data: their choices are ignored, answers are generated
    generation = evaluate_examples(
        model, prompter, CHOICE_EXAMPLES, cfg, max_length=512, classification=False
    )
    predictions = generate(model, prompter, CHOICE_EXAMPLES, 4, batch_size=6)
    references = [ex.output for ex in CHOICE_EXAMPLES]
    assert generation.primary == "rougeL"
    assert generation.values == {
        "rougeL": rouge_l_scores(predictions, references),
        "exact_match": exact_match_scores(predictions, references),
    }
    assert split_metrics({"val": generation}) == {
        "val_num_examples": 6.0,
        "val_rougeL": pytest.approx(np.mean(generation.values["rougeL"])),
        "val_exact_match": pytest.approx(np.mean(generation.values["exact_match"])),
    }


def test_classification_example_without_choices_is_a_clear_error(tiny) -> None:
    model, prompter = tiny
    cfg = EvalConfig(max_new_tokens=2, batch_size=2)
    mixed = [*CHOICE_EXAMPLES, GENERATION_EXAMPLES[0]]
    with pytest.raises(DataError, match="1 of 7 examples .* no answer choices.*'reverse'"):
        evaluate_examples(model, prompter, mixed, cfg, max_length=512, classification=True)


def test_split_scores_reject_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="expected the metrics"):
        SplitScores(True, {"rougeL": [1.0]}, [0])
    with pytest.raises(ValueError, match="one value per scored example"):
        SplitScores(True, {"accuracy": [1.0, 0.0]}, [0])


def test_evaluate_examples_skips_over_long(tiny) -> None:
    model, prompter = tiny
    cfg = EvalConfig(max_new_tokens=2, batch_size=2)
    tok = prompter.tokenizer
    short = len(tok(render_prompt(GENERATION_EXAMPLES[2]))["input_ids"]) + 2  # "x" + eos
    scores = evaluate_examples(
        model, prompter, GENERATION_EXAMPLES, cfg, max_length=short, classification=False
    )
    assert scores.example_indices == [2] and scores.num_examples == 1
    assert len(scores.values["rougeL"]) == 1
    with pytest.raises(DataError, match="model.max_length=5"):
        evaluate_examples(model, prompter, GENERATION_EXAMPLES, cfg, 5, classification=False)


def test_every_split_of_a_mixed_data_set_is_scored_with_the_same_metric(tiny) -> None:
    """The synthetic source mixes 2 choice families into 8: with 30 examples a family, a small
    split can hold choice examples only. It is still scored as generation, like every other
    split of the run (deciding per split crashed the run table with KeyError 'val_accuracy')."""
    model, prompter = tiny
    cfg = load_config(
        None,
        [
            "data.synthetic_per_task=30",
            "federation.num_clients=8",
            "data.dirichlet_alpha=0.1",
            "eval.max_new_tokens=2",
        ],
    )
    clients = [
        encode_client(cid, task, prompter, max_length=512)
        for cid, task in enumerate(prepare_client_splits(cfg))
    ]
    held_out = [(c, split) for c in clients for split in (c.splits.val, c.splits.test)]
    assert any(all(ex.choices for ex in split) for _, split in held_out), (
        "precondition: some split holds only examples with choices (change the partition)"
    )
    assert not any(c.classification for c in clients)
    scores = [
        evaluate_examples(model, c.prompter, split, cfg.eval, 512, classification=c.classification)
        for c, split in held_out
    ]
    assert {s.primary for s in scores} == {"rougeL"}
    assert {frozenset(s.means()) for s in scores} == {
        frozenset({"num_examples", "rougeL", "exact_match"})
    }


def _routed(model: torch.nn.Module) -> torch.nn.Module:
    """HMoLE experts with non-zero B on the model: every token routed through its own top-k."""
    adapter = inject_hmole(model, dropout=0.0)
    adapter.set_architecture({m: [0, 2, 5] for m in adapter.modules})
    with torch.no_grad():
        for layer in adapter.layers.values():
            for param in (layer.shared_B, layer.expert_B):
                param.normal_(generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("fixture", ["tiny", "chat_tiny"])
def test_shared_prompt_scoring_equals_one_sequence_per_choice(fixture: str, request) -> None:
    """The batch's common prefix run once, each prompt's rest after it, each choice after that:
    the full sequences' losses, with per-token expert routing too (choices of different
    lengths, batches of mixed prompts, one prompt alone, a prompt twice in one batch)."""
    model, prompter = request.getfixturevalue(fixture)
    model = _routed(copy.deepcopy(model))
    examples = [*CHOICE_EXAMPLES, CHOICE_EXAMPLES[0]]  # a repeated prompt: all of it in common
    full = choice_losses(model, prompter, examples, batch_size=4, shared_prompt=False)
    for batch_size in (1, 4, len(examples)):
        shared = choice_losses(model, prompter, examples, batch_size=batch_size)
        for full_row, shared_row in zip(full, shared, strict=True):
            assert shared_row == pytest.approx(full_row, rel=1e-4)
    assert len({round(loss, 3) for row in full for loss in row}) > 3  # the losses differ
