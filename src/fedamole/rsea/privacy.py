"""Metric differential privacy for the uploaded RSEA embeddings (SPEC 5).

Each vector v of length r is clipped to a fixed norm bound, then gets noise l * u with u uniform
on the unit sphere and l ~ Gamma(shape=r, scale=1/eta): the density of the noise is proportional
to exp(-eta * ||noise||), the standard mechanism for eta-metric DP in the Euclidean norm.
Clipping first bounds the distance between any two inputs, so the guarantee means something.
Larger eta = less noise; E||noise|| = r / eta.

All randomness comes from a torch.Generator, so a seeded generator gives the same noise. The
gamma draw uses that shape r is an integer: Gamma(r, 1/eta) is the sum of r Exp(rate=eta) draws,
and Tensor.exponential_ accepts a generator (torch's own gamma sampler does not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedamole.federation.types import ClientEmbeddings


def clip_to_norm(v: Tensor, bound: float) -> Tensor:
    """v scaled down to L2 norm `bound` if longer; shorter vectors are returned unchanged."""
    if bound <= 0:
        raise ValueError(f"privacy.clip_norm must be positive, got {bound}")
    norm = torch.linalg.vector_norm(v.double())
    if norm <= bound:
        return v.clone()
    return (v.double() * (bound / norm)).to(v.dtype)


def metric_dp_noise(v: Tensor, eta: float, clip_norm: float, generator: torch.Generator) -> Tensor:
    """clip(v) + l * u, u uniform on the unit sphere, l ~ Gamma(shape=len(v), scale=1/eta)."""
    if eta <= 0:
        raise ValueError(f"privacy.eta must be positive, got {eta}")
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"expected a non-empty vector, got shape {tuple(v.shape)}")
    device = generator.device
    direction = torch.randn(v.numel(), generator=generator, dtype=torch.float64, device=device)
    direction /= torch.linalg.vector_norm(direction)
    exponentials = torch.empty(v.numel(), dtype=torch.float64, device=device)
    length = exponentials.exponential_(eta, generator=generator).sum()
    noisy = clip_to_norm(v, clip_norm).double() + (length * direction).to(v.device)
    return noisy.to(v.dtype)


def privatize_embeddings(
    emb: ClientEmbeddings, eta: float, clip_norm: float, generator: torch.Generator
) -> ClientEmbeddings:
    """A noised copy of every vector in emb (drawn in sorted module / expert order, so the same
    generator state gives the same result whatever the dicts' insertion order)."""
    data = {
        module: metric_dp_noise(emb.data[module], eta, clip_norm, generator)
        for module in sorted(emb.data)
    }
    experts = {
        module: {
            expert: metric_dp_noise(vectors[expert], eta, clip_norm, generator)
            for expert in sorted(vectors)
        }
        for module, vectors in sorted(emb.experts.items())
    }
    return ClientEmbeddings(data=data, experts=experts)
