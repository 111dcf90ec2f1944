"""Client side of RSEA (SPEC 4): the data embedding and one embedding per local expert, per module,
as means over every non-padding token of the auxiliary split, in one gradient-free pass on the
model's device."""

from __future__ import annotations

import torch

from fedamole.device import MixedPrecision, autocast, model_device
from fedamole.hmole import HMoLEAdapter
from fedamole.types import ClientEmbeddings


@torch.no_grad()
def compute_embeddings(
    adapter: HMoLEAdapter,
    batches: list[dict[str, torch.Tensor]],
    mixed_precision: MixedPrecision = "no",
) -> ClientEmbeddings:
    """t_c^m = mean W_tok x and eps_{e,c}^m = mean A_e x over the aux tokens, for every module m.
    The vectors come back as float32 CPU tensors, ready to upload."""
    model = adapter.model
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with adapter.collecting_embeddings() as sums, autocast(device, mixed_precision):
            for batch in batches:
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
    finally:
        model.train(was_training)
    if not sums:
        raise ValueError("cannot compute RSEA embeddings: the auxiliary split produced no batches")
    data, experts = {}, {}
    for name, layer in adapter.layers.items():
        s = sums[name]
        count = max(s.tokens, 1)
        data[name] = (s.data / count).float().cpu()
        experts[name] = {
            e: (s.experts[i] / count).float().cpu() for i, e in enumerate(layer.expert_ids)
        }
    return ClientEmbeddings(data=data, experts=experts)
