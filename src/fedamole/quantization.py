"""The frozen backbone's linear layers quantised (``model.quantization``): 4-bit NF4 through
bitsandbytes, as QLoRA, FlowerTune and OpenFedLLM train, or int8 weight-only through torchao.

Only the frozen backbone is quantised: every decoder linear layer, not the embeddings or the
output head (whose weights are tied to the embeddings in small models), as transformers' own
bitsandbytes loading leaves them. Adapters wrap the quantised layers afterwards and keep
float32 master weights: HMoLE calls the wrapped layer for ``W0 x`` as it calls a plain Linear,
and PEFT dispatches its LoRA layer to the bitsandbytes or torchao variant by itself. The same
code runs on CPU and CUDA: each layer is quantised on the device it lives on.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import logging
from typing import Literal

from torch import nn

from fedamole.errors import UserError

log = logging.getLogger(__name__)

Quantization = Literal["none", "nf4", "int8"]
LIBRARY: dict[str, str] = {"nf4": "bitsandbytes", "int8": "torchao"}


class QuantizationError(UserError, RuntimeError):
    """The library ``model.quantization`` needs is not installed."""


def check_quantization(quantization: Quantization) -> None:
    """Refuse a quantisation whose library is missing, before any model loads."""
    library = LIBRARY.get(quantization)
    if library and importlib.util.find_spec(library) is None:
        raise QuantizationError(
            f"model.quantization={quantization} needs {library}, which is not installed here; "
            f"install fedamole's quantisation extra (`.venv/bin/pip install -e '.[quant]'`) or "
            "set model.quantization=none"
        )


def frozen_linears(model: nn.Module) -> list[str]:
    """Names of the plain linear layers to quantise: all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head
    ]


def quantize_backbone(model: nn.Module, quantization: Quantization) -> int:
    """Quantise ``model``'s frozen linear layers in place, on the device each one is on;
    returns how many were quantised (0 for ``none``)."""
    if quantization == "none":
        return 0
    check_quantization(quantization)
    names = frozen_linears(model)
    if quantization == "nf4":
        for name in names:
            _replace(model, name, _nf4(model.get_submodule(name)))
    else:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        chosen = set(names)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda _module, fqn: fqn in chosen)
    model.requires_grad_(False)
    _release_freed_memory()
    log.info("backbone: %d linear layers quantised to %s", len(names), quantization)
    return len(names)


def _release_freed_memory() -> None:
    """Hand the float weights' freed pages back to the OS: glibc keeps freed heap memory
    resident, so without this a quantised backbone's process stays as large as a float one's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _nf4(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weights in NF4, computing in the
    backbone's dtype; moving the weight to its device is what quantises it."""
    import bitsandbytes as bnb

    weight = linear.weight
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(weight.data.cpu(), requires_grad=False, quant_type="nf4").to(
        weight.device
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
