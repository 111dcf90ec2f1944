"""The HMoLE layer against SPEC 2, on the tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedamole.hmole import HMoLELinear, inject_hmole, load_balancing_loss
from fedamole.hmole.layer import RoutingContext


def _batch(tokenizer, texts=("the quick brown fox", "hi")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def _randomise(adapter, seed=0):
    """Give every adapter tensor non-zero values so no path is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _layer(d_in=6, d_out=5, rank=2, top_k=1, experts=(3,), dropout=0.0):
    torch.manual_seed(0)
    layer = HMoLELinear(nn.Linear(d_in, d_out), "m", RoutingContext(), rank, 4.0, dropout, top_k)
    layer.set_experts(list(experts))
    return layer


def test_zero_B_equals_frozen_backbone(tiny_model):
    model, tok = tiny_model
    batch = _batch(tok)
    with torch.no_grad():
        reference = model(**batch).logits
    adapter = inject_hmole(model, dropout=0.0)
    adapter.set_architecture({m: [0, 2, 5] for m in adapter.modules})
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


def test_one_expert_top1_is_plain_lora_by_hand():
    layer = _layer()
    with torch.no_grad():
        for p in (layer.shared_B, layer.expert_B):
            p.normal_()
    x = torch.randn(3, 4, 6)
    s = 4.0 / 2
    by_hand = (
        layer.base(x)
        + s * x @ layer.shared_A.T @ layer.shared_B.T
        + s * x @ layer.expert_A[0].T @ layer.expert_B[0].T
    )
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6)


def test_routing_stays_inside_client_set_and_weights_renormalise():
    layer = _layer(d_in=16, d_out=8, rank=4, top_k=2, experts=(1, 7, 12, 20))
    with torch.no_grad():
        layer.router_weight.normal_()
        layer.expert_A.normal_()
    ids, weights = layer.route(torch.randn(50, 16))
    assert set(ids.unique().tolist()) <= {1, 7, 12, 20}
    assert len(set(ids.unique().tolist())) > 1, "routing should use more than one expert"
    assert (ids[:, 0] != ids[:, 1]).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))


def test_forward_matches_sparse_top_k_sum():
    """h = W0 x + s B_s A_s x + sum over top-k of p~_e s B_e A_e x, written as a per-token loop."""
    layer = _layer(d_in=8, d_out=6, rank=2, top_k=2, experts=(0, 4, 9))
    with torch.no_grad():
        for p in (layer.shared_B, layer.expert_B, layer.router_weight):
            p.normal_()
    x = torch.randn(5, 8)
    ids, weights = layer.route(x)
    expected = layer.base(x) + layer.scaling * x @ layer.shared_A.T @ layer.shared_B.T
    for t in range(5):
        for e, w in zip(ids[t].tolist(), weights[t], strict=True):
            i = layer.expert_ids.index(e)
            expected[t] += w * layer.scaling * layer.expert_B[i] @ (layer.expert_A[i] @ x[t])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_by_hand_and_ignores_padding():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    top_idx = torch.tensor([[0], [1], [2]])
    # P = column means; f = (1/3, 1/3, 1/3); L = 3 * sum_e P_e f_e = sum_e P_e = 1.
    assert load_balancing_loss(probs, top_idx).item() == pytest.approx(1.0)
    mask = torch.tensor([True, True, False])
    # without token 3: P = (0.4, 0.4, 0.2), f = (0.5, 0.5, 0) -> 3 * (0.2 + 0.2) = 1.2
    assert load_balancing_loss(probs, top_idx, mask).item() == pytest.approx(1.2)
    padded = torch.cat([probs[:2], torch.tensor([[0.0, 0.0, 1.0]])])
    assert load_balancing_loss(padded, torch.tensor([[0], [1], [2]]), mask).item() == pytest.approx(
        1.2
    )


def test_model_lb_loss_ignores_padding_tokens(tiny_model):
    model, tok = tiny_model
    adapter = inject_hmole(model, dropout=0.0)
    adapter.set_architecture({m: [0, 1, 2] for m in adapter.modules})
    _randomise(adapter)
    model.train()
    short = tok(["hi there"], return_tensors="pt")
    model(**short)
    alone = adapter.load_balancing_loss().item()
    padded = _batch(tok, ["hi there", "a much longer sentence than that"])
    padded = {k: v[:1] for k, v in padded.items()}  # row 1 with padding to row 2's length
    assert padded["attention_mask"].sum() < padded["attention_mask"].numel()
    model(**padded)
    assert adapter.load_balancing_loss().item() == pytest.approx(alone, rel=1e-5)
    assert len(adapter.context.records) == len(adapter.modules)


def test_gradients_reach_adapters_never_backbone(tiny_model):
    model, tok = tiny_model
    adapter = inject_hmole(model, dropout=0.05, top_k=2)
    adapter.set_architecture({m: [0, 1, 2] for m in adapter.modules})
    _randomise(adapter)
    model.train()
    batch = _batch(tok)
    out = model(**batch, labels=batch["input_ids"])
    (out.loss + 0.001 * adapter.load_balancing_loss()).backward()
    for name, layer in adapter.layers.items():
        grad_A, grad_B = layer.down.grad.t(), layer.up.grad.t()
        r = layer.rank
        blocks = {
            "router": grad_A[-r:],
            "shared_A": grad_A[-2 * r : -r],
            "shared_B": grad_B[:, -r:],
        }
        for i in range(layer.num_experts):
            blocks[f"expert_A[{i}]"] = grad_A[i * r : (i + 1) * r]
            blocks[f"expert_B[{i}]"] = grad_B[:, i * r : (i + 1) * r]
        for part, grad in blocks.items():
            assert grad.abs().sum() > 0, f"{name}.{part} got no gradient"
    trainable = {id(p) for p in adapter.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert not p.requires_grad and p.grad is None, name


def test_rank_and_top_k_checked():
    with pytest.raises(ValueError, match="rank"):
        HMoLELinear(nn.Linear(4, 4), "m", RoutingContext(), 0, 16, 0.0, 2)
    layer = HMoLELinear(nn.Linear(4, 4), "m", RoutingContext(), 2, 16, 0.0, 3)
    with pytest.raises(ValueError, match=r"top_k=3.*got 2"):
        layer.set_experts([0, 1])


def test_scaling_is_alpha_over_rank():
    layer = _layer(rank=4)
    assert layer.scaling == pytest.approx(4.0 / 4)
    assert math.isclose(_layer(rank=2).scaling, 2.0)
