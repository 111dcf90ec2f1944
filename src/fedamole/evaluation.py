"""Per-client evaluation as in the paper: ROUGE-L F1 on greedy generations for open-ended tasks,
accuracy by lowest mean token loss over the answer choices for classification.

All metrics are fractions in [0, 1] (ROUGE-L is not multiplied by 100). The task type is the
data set's (see :class:`fedamole.data.pipeline.TaskSplits`), never guessed from one split.
Scores are kept per example (:class:`SplitScores`), so that uncertainty can be estimated by
resampling clients and examples, paired across methods; rounds report their means.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer, tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedamole.config import EvalConfig
from fedamole.data.example import DataError, Example
from fedamole.data.prompts import Prompter
from fedamole.data.tokenize import IGNORE_INDEX, collate, encode_example, encode_labelled
from fedamole.device import model_device
from fedamole.models import cache_argument, prepends_virtual_tokens
from fedamole.types import ACCURACY, EXACT_MATCH, NUM_EXAMPLES, ROUGE_L, split_metric

log = logging.getLogger("fedamole.evaluation")

_TRAILING_PUNCTUATION = ".,;:!?"
# Scripts written without spaces between words (Han, Hiragana, Katakana): one token a character.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_ROUGE_TOKEN = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+|[^\w\s]")


class RougeTokenizer(tokenizers.Tokenizer):
    """Lower-cased runs of Unicode letters and digits, single punctuation and sign characters,
    and single characters of unspaced scripts.

    rouge-score's default keeps only ASCII letters and digits: "28486" would match "-28486"
    exactly and any non-Latin answer would score 0.
    """

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(text.lower())


_ROUGE_SCORER = rouge_scorer.RougeScorer([ROUGE_L], tokenizer=RougeTokenizer())


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references, at least one; got "
            f"{len(predictions)} and {len(references)}"
        )


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 in [0, 1] of each prediction against its reference (:class:`RougeTokenizer`,
    unstemmed)."""
    _check_pairs(predictions, references)
    return [
        _ROUGE_SCORER.score(reference, prediction)[ROUGE_L].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: trim, casefold, collapse spaces, drop final punctuation."""
    text = re.sub(r"\s+", " ", text.strip().casefold())
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 for each prediction equal to its reference after `normalize_answer`, else 0.0."""
    _check_pairs(predictions, references)
    return [
        float(normalize_answer(prediction) == normalize_answer(reference))
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def split_metric_names(classification: bool) -> tuple[str, ...]:
    """The per-example metrics of a split: accuracy for classification, else ROUGE-L and EM."""
    return (ACCURACY,) if classification else (ROUGE_L, EXACT_MATCH)


@dataclass(frozen=True)
class SplitScores:
    """One evaluation split's scores, one value per metric and kept example.

    `values[name][i]` belongs to the split's example `example_indices[i]` (examples too long for
    the model are skipped); the order is the split's, so runs on the same data pair up.
    `classification` is the data set's task type; it decides the metrics and the primary one.
    """

    classification: bool
    values: dict[str, list[float]]
    example_indices: list[int]

    def __post_init__(self) -> None:
        expected = set(split_metric_names(self.classification))
        if set(self.values) != expected:
            raise ValueError(f"expected the metrics {sorted(expected)}, got {sorted(self.values)}")
        if any(len(v) != len(self.example_indices) for v in self.values.values()):
            raise ValueError("every metric needs one value per scored example")

    @property
    def primary(self) -> str:
        """The metric model selection uses: accuracy for classification, else ROUGE-L."""
        return ACCURACY if self.classification else ROUGE_L

    @property
    def num_examples(self) -> int:
        return len(self.example_indices)

    def means(self) -> dict[str, float]:
        """{"num_examples", then each metric's mean}, as rounds report them."""
        means = {name: float(np.mean(values)) for name, values in self.values.items()}
        return {NUM_EXAMPLES: float(self.num_examples), **means}


def split_metrics(scores: Mapping[str, SplitScores]) -> dict[str, float]:
    """Means of several splits as flat ``<split>_<metric>`` keys, e.g. ``val_rougeL``."""
    return {
        split_metric(split, name): value
        for split, split_scores in scores.items()
        for name, value in split_scores.means().items()
    }


@contextmanager
def eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; every module's own training flag is restored."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def padding_side(tokenizer: PreTrainedTokenizerBase, side: str) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def until_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    return next((ids[:i] for i, token in enumerate(ids) if token in stop_ids), ids)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompter: Prompter,
    examples: Sequence[Example],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Answers to `examples`' prompts (new text only, stripped): greedy, or sampled with
    `temperature` and nucleus `top_p` when `do_sample` (seed torch's generator first for
    repeatable samples), `batch_size` prompts at a time through :func:`generate_tokens`."""
    sampling = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p}
    outputs: list[str] = []
    for batch in _batches(examples, batch_size):
        prompts = [prompter.prompt_ids(example) for example in batch]
        new_tokens = generate_tokens(model, prompter, prompts, max_new_tokens, **sampling)
        outputs.extend(
            prompter.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_tokens
        )
    return outputs


@torch.no_grad()
def generate_tokens(
    model: PreTrainedModel,
    prompter: Prompter,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    **hooks: object,
) -> list[list[int]]:
    """Each prompt's new tokens, up to its first stop token: the one call to ``transformers``'
    ``generate`` that evaluation, ``fedamole generate`` and the server's whole batches share,
    so their greedy answers are the same tokens. ``hooks`` are further ``generate`` arguments
    that observe or end rows (a streamer, stopping criteria) or pick each row's adapter (PEFT's
    ``adapter_names``).

    Prompts are left-padded so every continuation starts right after its prompt. Generation
    stops at the prompter's stop tokens (the tokens training ends every response with; a
    model's generation_config may name others).
    """
    tokenizer, stop_ids = prompter.tokenizer, list(prompter.stop_token_ids)
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    with eval_mode(model), padding_side(tokenizer, "left"):
        encoded = tokenizer.pad({"input_ids": list(prompts)}, return_tensors="pt")
        encoded = encoded.to(model_device(model))
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            **sampling,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            **hooks,
        )
    new_tokens = generated[:, encoded["input_ids"].shape[1] :].tolist()
    return [until_stop(ids, stop_ids) for ids in new_tokens]


def _mean_token_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over each sequence's labelled tokens (one value per sequence)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1] :]  # prompt learning prepends virtual tokens
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
    prompter: Prompter,
    examples: Sequence[Example],
    batch_size: int,
    *,
    shared_prompt: bool = True,
) -> list[list[float]]:
    """Per example, the mean token loss of each choice as the response, encoded exactly as a
    training target (choice tokens + eos or end-of-turn).

    The end is scored too because training ends every response with it: it separates a choice
    from longer continuations that merely start with it. With ``shared_prompt`` each prompt is
    run once (a batch's common prefix once for all of it) and its KV cache continued by every
    choice (:func:`_shared_prompt_losses`): the causal model gives the same losses as one full
    sequence per choice, at a fraction of the tokens (4.5x faster on SNLI's three choices).
    Prompt-learning models score full sequences.
    """
    _check_choices(examples)
    if shared_prompt and not prepends_virtual_tokens(model):
        with eval_mode(model):
            return [
                row
                for batch in _batches(examples, batch_size)
                for row in _shared_prompt_losses(model, prompter, batch)
            ]
    pairs = [
        encode_labelled(prompter, replace(example, output=choice))
        for example in examples
        for choice in example.choices
    ]
    losses: list[float] = []
    with eval_mode(model):
        for batch in _batches(pairs, batch_size):
            tensors = collate(batch, prompter.tokenizer.pad_token_id)
            tensors = {key: value.to(model_device(model)) for key, value in tensors.items()}
            losses.extend(_mean_token_loss(model, tensors).tolist())
    return _by_example(losses, examples)


def _by_example(losses: list[float], examples: Sequence[Example]) -> list[list[float]]:
    """Losses listed choice by choice, example by example, split into one row per example."""
    rows, start = [], 0
    for example in examples:
        rows.append(losses[start : start + len(example.choices)])
        start += len(example.choices)
    return rows


def _shared_prompt_losses(
    model: PreTrainedModel, prompter: Prompter, examples: Sequence[Example]
) -> list[list[float]]:
    """Choice losses of one batch, each token run once.

    The prompts' common prefix (the system turn and, for one task, its instruction) is run once
    and its KV cache repeated for every prompt; the rest of each prompt follows in one forward,
    padded between the prefix and itself so that every row ends at the last column, whose
    logits predict each choice's first token; then every choice's remaining tokens go in one
    forward over that cache, repeated per choice. Padding is masked and positions count only
    real tokens, so each row sees exactly its own sequence.
    """
    device, pad_id = model_device(model), prompter.tokenizer.pad_token_id
    cache_name = cache_argument(model)
    prompts = [prompter.prompt_ids(example) for example in examples]
    targets = [
        prompter.target_ids(replace(example, output=choice))
        for example in examples
        for choice in example.choices
    ]
    owner = torch.tensor([i for i, ex in enumerate(examples) for _ in ex.choices], device=device)
    shared = _common_prefix(prompts)
    cache, mask = None, torch.ones(len(prompts), len(shared), dtype=torch.long, device=device)
    if shared:
        ids = torch.tensor([shared], device=device)
        cache = getattr(model(input_ids=ids, use_cache=True, logits_to_keep=1), cache_name)
        cache.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=device))
    with padding_side(prompter.tokenizer, "left"):  # every row ends at the last column
        rests = {"input_ids": [p[len(shared) :] for p in prompts]}
        padded = prompter.tokenizer.pad(rests, return_tensors="pt").to(device)
    rest, rest_mask = padded["input_ids"], padded["attention_mask"]
    mask = torch.cat([mask, rest_mask], dim=1)
    prefill = model(
        input_ids=rest,
        attention_mask=mask,
        position_ids=len(shared) + (rest_mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
        **({cache_name: cache} if cache is not None else {}),
    )
    first = prefill.logits[:, -1].float().log_softmax(-1)[owner]  # (rows, vocab)
    nll = -first.gather(1, torch.tensor([[t[0]] for t in targets], device=device))[:, 0]
    width = max(len(t) for t in targets) - 1
    if width > 0:  # the remaining tokens: each fed to predict the next
        cache = getattr(prefill, cache_name)
        cache.batch_select_indices(owner)
        fed = torch.full((len(targets), width), pad_id, device=device)
        labels = torch.full((len(targets), width), IGNORE_INDEX, device=device)
        for row, target in enumerate(targets):
            fed[row, : len(target) - 1] = torch.tensor(target[:-1])
            labels[row, : len(target) - 1] = torch.tensor(target[1:])
        lengths = mask.sum(1)[owner]
        continued = model(
            input_ids=fed,
            attention_mask=torch.cat([mask[owner], (labels != IGNORE_INDEX).long()], dim=1),
            position_ids=lengths[:, None] + torch.arange(width, device=device),
            use_cache=True,
            **{cache_name: cache},
        )
        nll = nll + F.cross_entropy(
            continued.logits.float().transpose(1, 2),
            labels,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).sum(1)
    losses = (nll / torch.tensor([len(t) for t in targets], device=device)).tolist()
    return _by_example(losses, examples)


def _common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The tokens every sequence starts with, leaving each at least one token of its own."""
    shortest = min(len(s) for s in sequences) - 1
    length = 0
    while length < shortest and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return list(sequences[0][:length])


def _check_choices(examples: Sequence[Example]) -> None:
    missing = [example for example in examples if not example.choices]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(examples)} examples of a classification data set have no "
            f"answer choices (first: label {missing[0].label!r}, instruction "
            f"{missing[0].instruction[:60]!r}); give every example its choices"
        )


def choice_hits(
    model: PreTrainedModel,
    prompter: Prompter,
    examples: Sequence[Example],
    batch_size: int,
    *,
    shared_prompt: bool = True,
) -> list[float]:
    """1.0 for each example whose lowest-loss choice equals the reference output, else 0.0."""
    losses = choice_losses(model, prompter, examples, batch_size, shared_prompt=shared_prompt)
    return [
        float(
            normalize_answer(example.choices[row.index(min(row))])
            == normalize_answer(example.output)
        )
        for example, row in zip(examples, losses, strict=True)
    ]


def fitting_indices(prompter: Prompter, examples: Sequence[Example], max_length: int) -> list[int]:
    """Positions of the examples that fit in `max_length` tokens; the others are skipped (and
    logged), as they are in training."""
    kept = [
        i
        for i, example in enumerate(examples)
        if encode_example(prompter, example, max_length) is not None
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
    return kept


def score_examples(
    model: PreTrainedModel,
    prompter: Prompter,
    examples: Sequence[Example],
    cfg: EvalConfig,
    *,
    classification: bool,
) -> dict[str, list[float]]:
    """Per-example {"accuracy"} for classification data, else {"rougeL", "exact_match"}."""
    if classification:
        shared = cfg.choice_scoring == "shared_prompt"
        hits = choice_hits(model, prompter, examples, cfg.batch_size, shared_prompt=shared)
        return {ACCURACY: hits}
    predictions = generate(model, prompter, examples, cfg.max_new_tokens, cfg.batch_size)
    references = [example.output for example in examples]
    return {
        ROUGE_L: rouge_l_scores(predictions, references),
        EXACT_MATCH: exact_match_scores(predictions, references),
    }


def evaluate_examples(
    model: PreTrainedModel,
    prompter: Prompter,
    examples: Sequence[Example],
    cfg: EvalConfig,
    max_length: int,
    *,
    classification: bool,
) -> SplitScores:
    """Score one split: accuracy when the data set is classification, else ROUGE-L and exact
    match. Examples longer than `max_length` are skipped, as they are in training."""
    indices = fitting_indices(prompter, examples, max_length)
    kept = [examples[i] for i in indices]
    values = score_examples(model, prompter, kept, cfg, classification=classification)
    return SplitScores(classification, values, indices)
