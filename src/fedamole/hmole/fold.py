"""A client's routed experts folded into one plain LoRA (``fedamole export --static-lora``).

Servers that only know LoRA cannot route tokens, so each module's shared expert (weight 1) and its
local experts, each at its mean routing weight over the client's tokens, are stacked into one
LoRA of a single rank. The result equals the routed model only where routing is constant; the
export measures what it loses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from fedamole.device import autocast, model_device
from fedamole.hmole.adapter import HMoLEAdapter
from fedamole.hmole.keys import expert_key, shared_key
from fedamole.types import StateDict

RoutingWeights = dict[str, dict[int, float]]  # module -> expert id -> mean routing weight


@torch.no_grad()
def mean_routing_weights(
    adapter: HMoLEAdapter, batches: Iterable[Mapping[str, Tensor]], mixed_precision: str = "no"
) -> RoutingWeights:
    """Per module, each local expert's routing weight (top-k renormalised, 0 outside the top k)
    averaged over the non-padding tokens of ``batches`` (``input_ids`` and ``attention_mask``)."""
    routed: dict[str, tuple[Tensor, Tensor]] = {}  # module -> this batch's (expert ids, gates)

    def capture(name: str, layer: nn.Module):
        def hook(_module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
            routed[name] = layer.route(args[0])  # (tokens, top_k) global ids and their weights

        return hook

    hooks = [layer.register_forward_hook(capture(n, layer)) for n, layer in adapter.layers.items()]
    sums: dict[str, Tensor] = {}
    tokens, model = 0, adapter.model
    device = model_device(model)
    try:
        model.eval()
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with autocast(device, mixed_precision):
                model(input_ids=ids, attention_mask=mask)
            real = mask.reshape(-1).bool()
            tokens += int(real.sum())
            for name, (experts, gates) in routed.items():
                size = max(adapter.layers[name].expert_ids) + 1
                total = sums.setdefault(name, torch.zeros(size, dtype=torch.float64, device=device))
                total.index_add_(0, experts[real].flatten(), gates[real].flatten().double())
    finally:
        for hook in hooks:
            hook.remove()
    return {
        name: {e: float(sums[name][e]) / tokens for e in layer.expert_ids}
        for name, layer in adapter.layers.items()
    }


def folded_factors(
    state: StateDict, module: str, weights: Mapping[int, float], rank: int
) -> tuple[Tensor, Tensor]:
    """A' = [A_s; w_1 A_1; ...] and B' = [B_s, B_1, ...], zero-padded to ``rank``, so that
    B' A' = B_s A_s + sum_e w_e B_e A_e (zero rows and columns add nothing)."""
    a = torch.cat(
        [state[shared_key(module, "A")]]
        + [w * state[expert_key(module, e, "A")] for e, w in weights.items()]
    )
    b = torch.cat(
        [state[shared_key(module, "B")]] + [state[expert_key(module, e, "B")] for e in weights],
        dim=1,
    )
    pad = rank - a.shape[0]
    return F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))


@torch.no_grad()
def fold_static_lora(
    adapter: HMoLEAdapter, weights: RoutingWeights, base: nn.Module, lora: LoraConfig
) -> PeftModel:
    """A PEFT LoRA on ``base`` (a fresh copy of the backbone) equal to the routed model with every
    local expert at its fixed weight. ``lora`` is one expert as a LoRA (HMoLE's rank, alpha and
    target modules). One rank for every module, (k_max + 1) r, so servers that need a single rank
    (vLLM) take it; lora_alpha = (alpha / r) * rank keeps HMoLE's scale."""
    rank = (max(len(ws) for ws in weights.values()) + 1) * lora.r
    config = dataclasses.replace(lora, r=rank, lora_alpha=lora.lora_alpha / lora.r * rank)
    model = get_peft_model(base, config)
    layers = {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    }
    if set(layers) != set(adapter.modules):
        raise ValueError(
            f"PEFT adapts {sorted(set(layers) ^ set(adapter.modules))[:3]} differently from "
            "HMoLE's target modules; cannot fold the experts into a LoRA"
        )
    state = adapter.state()
    for name, layer in layers.items():
        a, b = folded_factors(state, name, weights[name], rank)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return model.eval()
