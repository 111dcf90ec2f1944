"""Alpaca-style prompt templates: the single place where an `Example` becomes model text."""

from __future__ import annotations

from fedamole.data.example import Example

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_INSTRUCTION = (
    "Does the premise entail the hypothesis? "
    "Answer with one word: entailment, neutral or contradiction."
)


def nli_input(premise: str, hypothesis: str) -> str:
    """The input field of a 3-way NLI example (SNLI)."""
    return f"Premise: {premise}\nHypothesis: {hypothesis}"


def render_prompt(example: Example) -> str:
    """The text the model is conditioned on; the shorter template when there is no input."""
    if example.input.strip():
        return PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
    return PROMPT_NO_INPUT.format(instruction=example.instruction)


def render_response(example: Example) -> str:
    """The target text (loss and metrics are computed on it)."""
    return example.output
