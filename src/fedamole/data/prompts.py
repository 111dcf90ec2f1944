"""Prompt formats: the single place where an `Example` becomes model text and token ids.

Two formats (``data.prompt_format``):

- ``alpaca``: the paper's Alpaca template; the prompt gets the tokenizer's usual special tokens
  (e.g. a BOS) and the target is the output followed by the tokenizer's eos.
- ``chat``: the tokenizer's own chat template, one user turn and one assistant turn. The user
  message is the instruction, then a blank line and the input when there is one; no system
  message is added (a template may add its own default one). The prompt is the user turn with
  the template's generation prompt; the target is the assistant turn as the template renders it
  after that prompt (the output, then the end-of-turn token(s)), cut after its last special
  token, so the template's trailing newline is neither trained nor scored. Rendered text already
  holds the template's special tokens, so it is tokenised without adding any.

``auto`` (the default) is ``chat`` when the tokenizer has a chat template, else ``alpaca``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedTokenizerBase

from fedamole.config import ConfigError, PromptFormat
from fedamole.data.example import UNLABELLED, Example

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

_PROBE = Example("Say yes.", "", "yes", "probe")  # renders the template once, to check it


def nli_input(premise: str, hypothesis: str) -> str:
    """The input field of a 3-way NLI example (SNLI)."""
    return f"Premise: {premise}\nHypothesis: {hypothesis}"


def render_prompt(example: Example) -> str:
    """The Alpaca prompt; the shorter template when there is no input."""
    if example.input.strip():
        return PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
    return PROMPT_NO_INPUT.format(instruction=example.instruction)


def render_response(example: Example) -> str:
    """The target text (loss and metrics are computed on it)."""
    return example.output


def user_message(example: Example) -> str:
    """The chat format's user turn: the instruction, then a blank line and the input if any."""
    if example.input.strip():
        return f"{example.instruction}\n\n{example.input}"
    return example.instruction


@dataclass(frozen=True)
class Prompter:
    """How examples become prompts and labelled targets for one tokenizer; build it with
    :func:`build_prompter`, once per run, and use it for training, scoring and generation alike.

    `stop_token_ids`: generation stops at the first of these (the chat template's end-of-turn
    token(s) and the tokenizer's eos).
    """

    tokenizer: PreTrainedTokenizerBase
    chat: bool
    stop_token_ids: tuple[int, ...]

    @cached_property
    def longest_token_chars(self) -> int:
        """An upper bound on the characters one token covers (its vocabulary spelling is at
        least as long), so a text of more than ``n * longest_token_chars`` characters surely
        has more than ``n`` tokens: a server refuses it without tokenising it."""
        return max(len(token) for token in self.tokenizer.get_vocab())

    def prompt(self, example: Example) -> str:
        """The text the model is conditioned on (ends with the chat generation prompt)."""
        if self.chat:
            return _render_chat(self.tokenizer, example, with_response=False)
        return render_prompt(example)

    def prompt_ids(self, example: Example) -> list[int]:
        """The prompt's token ids, exactly as generation and training see them."""
        return self.text_ids(self.prompt(example))

    def text_ids(self, text: str) -> list[int]:
        """Token ids of text already in the prompt format (e.g. a raw completion prompt)."""
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """A conversation's prompt ids from role/content messages: through the chat template, as
        training rendered its user turn (one user message gives exactly :meth:`prompt_ids` of
        that instruction); the Alpaca format knows one user turn only."""
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
            )
            return self.text_ids(text)
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise ValueError(
                "this model was trained on single-turn Alpaca prompts: send exactly one message, "
                "with role 'user'"
            )
        return self.prompt_ids(Example(messages[0]["content"], "", "", UNLABELLED))

    def target_ids(self, example: Example) -> list[int]:
        """The token ids that follow the prompt and carry the loss: the output and its end."""
        if not self.chat:
            output = self.tokenizer(render_response(example), add_special_tokens=False)
            return [*output["input_ids"], self.tokenizer.eos_token_id]
        ids = self.tokenizer(_chat_target(self.tokenizer, example), add_special_tokens=False)
        return _through_last(ids["input_ids"], self.stop_token_ids)


def build_prompter(
    tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat = "auto"
) -> Prompter:
    """The prompt format for `tokenizer` (see the module doc); a template that cannot be used is
    a clear error naming ``data.prompt_format``, raised here, before any training."""
    has_template = bool(tokenizer.chat_template)
    if prompt_format == "chat" and not has_template:
        raise ConfigError(
            f"data.prompt_format=chat but the tokenizer ({tokenizer.name_or_path or 'unnamed'}) "
            "has no chat template; use data.prompt_format=alpaca (or auto)"
        )
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    if prompt_format == "alpaca" or (prompt_format == "auto" and not has_template):
        if not eos:
            raise ConfigError(
                "the tokenizer of model.name has no eos token, which Alpaca responses "
                "(data.prompt_format=alpaca) end with; use a model whose tokenizer has one"
            )
        return Prompter(tokenizer, chat=False, stop_token_ids=eos)
    end_of_turn = _end_of_turn_ids(tokenizer)
    stop_token_ids = tuple(dict.fromkeys((*end_of_turn, *eos)))
    return Prompter(tokenizer, chat=True, stop_token_ids=stop_token_ids)


def _render_chat(tokenizer: PreTrainedTokenizerBase, example: Example, with_response: bool) -> str:
    messages = [{"role": "user", "content": user_message(example)}]
    if with_response:
        messages.append({"role": "assistant", "content": render_response(example)})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not with_response
    )


def _chat_target(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    """The assistant turn as rendered after the generation prompt."""
    prompt = _render_chat(tokenizer, example, with_response=False)
    conversation = _render_chat(tokenizer, example, with_response=True)
    if not conversation.startswith(prompt):
        raise ConfigError(
            "data.prompt_format=chat: the chat template does not render a conversation as the "
            "generation prompt followed by the answer, so the answer tokens cannot be separated; "
            "use data.prompt_format=alpaca"
        )
    return conversation[len(prompt) :]


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special tokens the template writes after an assistant's answer."""
    target = _chat_target(tokenizer, _PROBE)
    answer_at = target.find(_PROBE.output)
    if answer_at < 0:
        raise ConfigError(
            "data.prompt_format=chat: the chat template does not render the assistant's answer "
            "verbatim; use data.prompt_format=alpaca"
        )
    ending = target[answer_at + len(_PROBE.output) :]
    ids = tokenizer(ending, add_special_tokens=False)["input_ids"]
    special = tuple(dict.fromkeys(i for i in ids if _is_special(tokenizer, i)))
    if not special:
        raise ConfigError(
            f"data.prompt_format=chat: the chat template ends an assistant turn with {ending!r}, "
            "which holds no special token, so generation could not stop at the end of a turn; "
            "use data.prompt_format=alpaca"
        )
    return special


def _is_special(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)


def _through_last(ids: list[int], ends: Sequence[int]) -> list[int]:
    """`ids` up to and including the last of `ends` (all of them if none occurs)."""
    last = max((i for i, token in enumerate(ids) if token in ends), default=len(ids) - 1)
    return ids[: last + 1]
