"""Metric-DP noise on RSEA embeddings: clipping, noise scale r / eta, reproducibility."""

from __future__ import annotations

import pytest
import torch

from fedamole.rsea.privacy import (
    clip_to_norm,
    embedding_norms,
    metric_dp_noise,
    noise_generator,
    privatize_embeddings,
)
from fedamole.types import ClientEmbeddings


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_clip_shrinks_long_vectors_and_keeps_short_ones() -> None:
    long = torch.tensor([3.0, 4.0])
    short = torch.tensor([0.3, 0.4])
    torch.testing.assert_close(clip_to_norm(long, 1.0), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(clip_to_norm(short, 1.0), short)
    assert clip_to_norm(long, 1.0) is not long


def test_noise_is_added_to_the_clipped_vector() -> None:
    """The noise draw does not depend on v, so noised(v) - noised(0) is clip(v) exactly."""
    v = torch.tensor([30.0, -40.0, 0.0, 0.0], dtype=torch.float64)
    noise = metric_dp_noise(torch.zeros(4, dtype=torch.float64), 10.0, 2.0, _gen(5))
    noised = metric_dp_noise(v, 10.0, 2.0, _gen(5))
    signal = noised - noise
    assert torch.linalg.vector_norm(signal).item() == pytest.approx(2.0)
    torch.testing.assert_close(signal, v * (2.0 / 50.0))


@pytest.mark.parametrize(("rank", "eta"), [(8, 50.0), (4, 1.0)])
def test_noise_norm_is_gamma_with_mean_r_over_eta(rank: int, eta: float) -> None:
    gen = _gen(0)
    zero = torch.zeros(rank, dtype=torch.float64)
    draws = torch.stack([metric_dp_noise(zero, eta, 1.0, gen) for _ in range(4000)])
    norms = torch.linalg.vector_norm(draws, dim=1)
    assert norms.mean().item() == pytest.approx(rank / eta, rel=0.03)
    assert norms.std().item() == pytest.approx(rank**0.5 / eta, rel=0.1)
    directions = draws / norms[:, None]
    assert directions.mean(dim=0).abs().max().item() < 0.06


def test_same_seed_gives_same_noise() -> None:
    v = torch.randn(8, generator=_gen(1))
    first = metric_dp_noise(v, 1.0, 1.0, _gen(7))
    torch.testing.assert_close(first, metric_dp_noise(v, 1.0, 1.0, _gen(7)))
    assert not torch.equal(first, metric_dp_noise(v, 1.0, 1.0, _gen(8)))


@pytest.mark.parametrize(("eta", "clip"), [(0.0, 1.0), (1.0, 0.0)])
def test_non_positive_settings_are_rejected(eta: float, clip: float) -> None:
    with pytest.raises(ValueError, match="privacy"):
        metric_dp_noise(torch.ones(3), eta, clip, _gen(0))


def _embeddings(order: list[str]) -> ClientEmbeddings:
    gen = _gen(2)
    vectors = {m: torch.randn(4, generator=gen) for m in ["a", "b"]}
    experts = {m: {e: torch.randn(4, generator=gen) for e in (3, 1)} for m in ["a", "b"]}
    return ClientEmbeddings(
        data={m: vectors[m] for m in order},
        experts={m: experts[m] for m in order},
    )


def test_privatize_noises_every_vector_reproducibly() -> None:
    emb = _embeddings(["a", "b"])
    first = privatize_embeddings(emb, 50.0, 1.0, _gen(3))
    reordered = privatize_embeddings(_embeddings(["b", "a"]), 50.0, 1.0, _gen(3))
    norms = embedding_norms(emb, 1.0)
    clean = [torch.linalg.vector_norm(v).item() for v in emb.data.values()] + [
        torch.linalg.vector_norm(v).item() for ex in emb.experts.values() for v in ex.values()
    ]
    assert norms["emb_norm_max"] == pytest.approx(max(clean))
    assert norms["emb_clipped_share"] == pytest.approx(sum(n > 1.0 for n in clean) / len(clean))
    for module in ["a", "b"]:
        assert first.data[module].shape == emb.data[module].shape
        assert first.data[module].dtype == emb.data[module].dtype
        assert not torch.equal(first.data[module], clip_to_norm(emb.data[module], 1.0))
        torch.testing.assert_close(first.data[module], reordered.data[module])
        assert set(first.experts[module]) == {1, 3}
        for expert, vector in first.experts[module].items():
            assert not torch.equal(vector, clip_to_norm(emb.experts[module][expert], 1.0))
            torch.testing.assert_close(vector, reordered.experts[module][expert])


def test_noise_generator_draws_from_os_entropy_unless_a_test_seed_is_given() -> None:
    unseeded = [noise_generator(None, 3, 1).initial_seed() for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # 2**-64 chance of a false failure
    seeded = [noise_generator(7, 3, 1).initial_seed() for _ in range(2)]
    assert seeded[0] == seeded[1] != noise_generator(7, 3, 2).initial_seed()
