"""Metric differential privacy for the uploaded RSEA embeddings (SPEC 5).

Each vector v of length r is clipped to a fixed norm bound, then gets noise l * u with u uniform
on the unit sphere and l ~ Gamma(shape=r, scale=1/eta): the density of the noise is proportional
to exp(-eta * ||noise||), the standard mechanism for eta-metric DP in the Euclidean norm.
Clipping first bounds the distance between any two inputs, so the guarantee means something.
Larger eta = less noise; E||noise|| = r / eta.

The noise must be unpredictable to the server, which knows the run seed and every round and
client index: :func:`noise_generator` seeds it from OS entropy, never from the run seed (a fixed
``privacy.seed`` exists for tests only). All randomness comes from that one torch.Generator. The
gamma draw uses that shape r is an integer: Gamma(r, 1/eta) is the sum of r Exp(rate=eta) draws,
and Tensor.exponential_ accepts a generator (torch's own gamma sampler does not).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedamole.types import ClientEmbeddings


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


def noise_generator(test_seed: int | None, round_idx: int, client_id: int) -> torch.Generator:
    """A generator for privacy noise: OS entropy, or ``privacy.seed`` (tests only) mixed with the
    round and client so that a seeded test still draws different noise per client and round."""
    generator = torch.Generator()
    if test_seed is None:
        generator.seed()  # a non-deterministic seed from std::random_device
    else:
        state = np.random.SeedSequence([test_seed, round_idx, client_id]).generate_state(1)
        generator.manual_seed(int(state[0]))
    return generator


def embedding_norms(emb: ClientEmbeddings, clip_norm: float) -> dict[str, float]:
    """Norms of the clean vectors and the share that clipping shortens: what ``privacy.clip_norm``
    should be calibrated against (a bound far above every norm adds nothing; far below, every
    vector is cut to the same length and carries direction only). Without privacy a client
    reports all three; with privacy only the clipped share, so the sizes stay private."""
    norms = torch.stack([torch.linalg.vector_norm(v.double()) for v in _vectors(emb)])
    return {
        "emb_norm_median": norms.median().item(),
        "emb_norm_max": norms.max().item(),
        "emb_clipped_share": (norms > clip_norm).double().mean().item(),
    }


def _vectors(emb: ClientEmbeddings) -> list[Tensor]:
    return list(emb.data.values()) + [v for ex in emb.experts.values() for v in ex.values()]


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
