"""A readable local training loop shared by FedAMoLE and every baseline: a fixed number of Adam
steps over shuffled batches, next-token loss on response tokens plus an optional auxiliary loss,
on the model's device, under the configured mixed precision, with the same gradient clipping for
every method."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedamole.config import OptimConfig
from fedamole.data.tokenize import IGNORE_INDEX, collate
from fedamole.device import autocast, model_device
from fedamole.models import prepends_virtual_tokens

Batch = dict[str, Tensor]
StepCallback = Callable[[int, float], None]


def round_seed(seed: int, round_idx: int, client_id: int) -> int:
    """A seed per (run, round, client), so a resumed run replays exactly the same randomness."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_id) % (2**63 - 1)


def shuffled_batches(
    encoded: Sequence[dict[str, list[int]]],
    batch_size: int,
    pad_id: int,
    generator: torch.Generator,
) -> Iterator[Batch]:
    """Endless epochs of shuffled batches; a client with fewer examples than a batch repeats them."""
    if not encoded:
        raise ValueError("no training examples to draw batches from")
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([encoded[i] for i in order[start : start + batch_size]], pad_id)


def fixed_batches(
    encoded: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int
) -> list[Batch]:
    return [
        collate(list(encoded[i : i + batch_size]), pad_id)
        for i in range(0, len(encoded), batch_size)
    ]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def response_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The model's own causal-LM loss (mean NLL over the labelled tokens), with the vocabulary
    projection run only at the positions that predict a labelled token in some row.

    Responses are a few tokens of a long prompt, and the projection onto a 49k-token vocabulary
    (and the float32 cross-entropy over it) is a large part of a small model's step; skipping
    positions whose next token is never scored changes no gradient. Prompt-learning models add
    virtual positions, so they keep the model's own loss.
    """
    if prepends_virtual_tokens(model):
        return model(**batch).loss
    labels = batch["labels"]
    predicting = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()[:, 0]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=predicting,
    ).logits
    return F.cross_entropy(
        logits.float().transpose(1, 2), labels[:, predicting + 1], ignore_index=IGNORE_INDEX
    )


def train_steps(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    optim: OptimConfig,
    aux_loss: Callable[[], Tensor] | None = None,
    on_step: StepCallback | None = None,
) -> float:
    """Run ``steps`` Adam steps on ``params``; returns the mean language-modelling loss."""
    device = model_device(model)
    optimizer = torch.optim.Adam(params, lr=lr, eps=optim.adam_eps, weight_decay=optim.weight_decay)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler(device.type, enabled=optim.mixed_precision == "fp16")
    model.train()
    losses = []
    for step in range(steps):
        with autocast(device, optim.mixed_precision):
            batch = to_device(next(batches), device)
            lm_loss = (
                response_loss(model, batch)
                if optim.loss_logits == "labelled"
                else model(**batch).loss
            )
            loss = lm_loss + optim.lb_weight * aux_loss() if aux_loss is not None else lm_loss
        scaler.scale(loss).backward()
        if optim.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(lm_loss.detach())
        if on_step is not None:
            on_step(step + 1, lm_loss.item())
    model.eval()
    return torch.stack(losses).float().mean().item()
