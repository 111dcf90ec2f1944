"""Shared fixtures: the tiny random Llama, a ChatML tokenizer for it, the shared data samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedamole.models import load_base_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_model():
    """A fresh tiny random Llama and its byte-level tokenizer (frozen, eval mode)."""
    return load_base_model("tiny-random-llama")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared data samples not found at {SHARED_DATA} (../shared/data beside the repo)"
        )
    return SHARED_DATA


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """The tiny tokenizer with ChatML's two special tokens and turns, as SmolLM2-Instruct renders
    them (without its default system message). A model using it must be resized to its vocab."""
    tokenizer = load_base_model("tiny-random-llama")[1]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer
