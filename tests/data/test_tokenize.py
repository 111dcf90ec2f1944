"""Tokenisation: loss on the response and its end only (eos, or the chat template's end of turn),
one BOS with BOS-adding tokenizers, drops counted."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tokenizers import processors

from fedamole.data.example import Example
from fedamole.data.prompts import build_prompter, render_prompt
from fedamole.data.tokenize import IGNORE_INDEX, collate, encode_example, encode_split
from fedamole.models import load_base_model

EXAMPLE = Example("Add the numbers.", "2 + 3", "5 apples", "arithmetic")


@pytest.fixture(scope="module")
def tokenizer():
    return load_base_model("tiny-random-llama")[1]


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The tiny tokenizer made to prepend a BOS to every text, as Llama-3's does."""
    with_bos = copy.deepcopy(tokenizer)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", with_bos.bos_token_id)]
    )
    return with_bos


@pytest.mark.parametrize("name", ["tokenizer", "bos_tokenizer"])
def test_labels_mask_exactly_the_prompt(name: str, request) -> None:
    tok = request.getfixturevalue(name)
    prompt_ids = tok(render_prompt(EXAMPLE))["input_ids"]
    encoded = encode_example(build_prompter(tok, "alpaca"), EXAMPLE, max_length=1000)
    ids, labels = encoded["input_ids"], encoded["labels"]
    cut = len(prompt_ids)
    assert ids[:cut] == prompt_ids
    assert labels[:cut] == [IGNORE_INDEX] * cut
    assert labels[cut:] == ids[cut:] and IGNORE_INDEX not in labels[cut:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[cut:-1]) == EXAMPLE.output
    assert ids.count(tok.bos_token_id) == (name == "bos_tokenizer")  # one BOS, at the start


@pytest.fixture(scope="module")
def chatml_bos_tokenizer(chatml_tokenizer, bos_tokenizer):
    """ChatML on a tokenizer that prepends a BOS to every text it encodes with special tokens."""
    tok = copy.deepcopy(chatml_tokenizer)
    tok.backend_tokenizer.post_processor = bos_tokenizer.backend_tokenizer.post_processor
    return tok


@pytest.mark.parametrize("bos_in_template", [False, True])
def test_chat_labels_only_the_answer_and_end_of_turn(chatml_bos_tokenizer, bos_in_template) -> None:
    """No prompt token carries a label, the labelled tokens are the answer and <|im_end|>, and
    the BOS is the template's business: rendered text gets none from the tokenizer (Llama-3's
    template writes "{{ bos_token }}" itself; ChatML has none)."""
    tok = copy.deepcopy(chatml_bos_tokenizer)
    bos = "<s>" if bos_in_template else ""
    tok.chat_template = bos + tok.chat_template
    user = "<|im_start|>user\nAdd the numbers.\n\n2 + 3<|im_end|>\n"
    prompt = f"{bos}{user}<|im_start|>assistant\n"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    encoded = encode_example(build_prompter(tok, "chat"), EXAMPLE, max_length=1000)
    ids, labels = encoded["input_ids"], encoded["labels"]
    cut = len(prompt_ids)
    assert ids[:cut] == prompt_ids
    assert labels[:cut] == [IGNORE_INDEX] * cut
    assert labels[cut:] == ids[cut:] and IGNORE_INDEX not in labels[cut:]
    assert tok.decode(ids[cut:]) == "5 apples<|im_end|>"
    assert ids.count(tok.bos_token_id) == bos_in_template


def test_over_long_examples_dropped_and_counted(tokenizer, caplog) -> None:
    prompter = build_prompter(tokenizer, "alpaca")
    length = len(encode_example(prompter, EXAMPLE, max_length=1000)["input_ids"])
    assert encode_example(prompter, EXAMPLE, max_length=length) is not None
    assert encode_example(prompter, EXAMPLE, max_length=length - 1) is None
    longer = Example(EXAMPLE.instruction, EXAMPLE.input, EXAMPLE.output + " and pears", "x")
    with caplog.at_level(logging.WARNING, logger="fedamole.data"):
        kept, dropped = encode_split(prompter, [EXAMPLE, longer, EXAMPLE], max_length=length)
    assert (len(kept), dropped) == (2, 1)
    assert "dropped 1 of 3" in caplog.text


def test_collate_right_pads() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())
