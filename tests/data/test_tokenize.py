"""Tokenisation: loss on response + eos only, one BOS with BOS-adding tokenizers, drops counted."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tokenizers import processors

from fedamole.data.example import Example
from fedamole.data.prompts import render_prompt
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
    encoded = encode_example(tok, EXAMPLE, max_length=1000)
    ids, labels = encoded["input_ids"], encoded["labels"]
    cut = len(prompt_ids)
    assert ids[:cut] == prompt_ids
    assert labels[:cut] == [IGNORE_INDEX] * cut
    assert labels[cut:] == ids[cut:] and IGNORE_INDEX not in labels[cut:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[cut:-1]) == EXAMPLE.output
    assert ids.count(tok.bos_token_id) == (name == "bos_tokenizer")  # one BOS, at the start


def test_over_long_examples_dropped_and_counted(tokenizer, caplog) -> None:
    length = len(encode_example(tokenizer, EXAMPLE, max_length=1000)["input_ids"])
    assert encode_example(tokenizer, EXAMPLE, max_length=length) is not None
    assert encode_example(tokenizer, EXAMPLE, max_length=length - 1) is None
    longer = Example(EXAMPLE.instruction, EXAMPLE.input, EXAMPLE.output + " and pears", "x")
    with caplog.at_level(logging.WARNING, logger="fedamole.data"):
        kept, dropped = encode_split(tokenizer, [EXAMPLE, longer, EXAMPLE], max_length=length)
    assert (len(kept), dropped) == (2, 1)
    assert "dropped 1 of 3" in caplog.text


def test_collate_right_pads() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())
