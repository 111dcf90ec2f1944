"""Continuous batching, the second of the two decoders: rows that join a running batch give the
greedy text of the first (`fedamole generate`'s, :func:`fedamole.evaluation.generate_tokens`),
a seeded sampled row gives the same sample whatever shares its batch, and a row whose client went
away stops at its next token."""

from __future__ import annotations

from functools import partial

import pytest
from serving_cases import MAX_TOKENS, PROMPTS

from fedamole.serving.decoding import DecodeRow, Sampling
from fedamole.serving.pool import RunPool


@pytest.mark.parametrize("method", ["fedamole", "fedit"])
def test_rows_that_join_a_running_batch_decode_as_if_alone(method, served, generated):
    """Rows admitted while others are mid-decode, for mixed clients, give `fedamole generate`'s
    greedy answers; a seeded sampled row gives the same sample whatever else shares its batch."""
    pool = RunPool(served[method])
    prompter = pool.prompter("client-0")
    jobs = [(i % 3, PROMPTS[i % len(PROMPTS)]) for i in range(7)]
    rows = [
        DecodeRow(f"client-{c}", prompter.chat_ids([{"role": "user", "content": p}]), MAX_TOKENS)
        for c, p in jobs
    ]
    answers: dict[int, object] = {}
    batch = pool.continuous_batch()
    for step, (start, stop) in enumerate([(0, 2), (2, 5), (5, 7)]):
        batch.admit([(rows[i], partial(answers.__setitem__, i)) for i in range(start, stop)])
        for _ in range(step + 1):
            batch.step()
    while batch.active:
        batch.step()
    assert [answers[i].text for i in range(7)] == [generated[method, c, p] for c, p in jobs]

    def sampled(company: int) -> str:
        seeded = DecodeRow(
            "client-1", rows[1].prompt_ids, MAX_TOKENS, Sampling(temperature=1.0, seed=7)
        )
        out: dict[int, object] = {}
        batch.admit([(seeded, partial(out.__setitem__, 0))])
        batch.admit([(rows[i], partial(out.__setitem__, 1 + i)) for i in range(company)])
        while batch.active:
            batch.step()
        return out[0].text

    assert sampled(0) == sampled(4)


def test_a_row_whose_client_went_away_stops_at_its_next_token(served):
    pool = RunPool(served["fedamole"], [0, 1])
    prompt = pool.prompter("client-0").chat_ids([{"role": "user", "content": PROMPTS[0]}])
    stays, leaves = DecodeRow("client-0", prompt, 20), DecodeRow("client-1", prompt, 20)
    out: dict[str, object] = {}
    batch = pool.continuous_batch()
    batch.admit(
        [(stays, partial(out.__setitem__, "stays")), (leaves, partial(out.__setitem__, "leaves"))]
    )
    batch.step()
    leaves.cancelled = True  # what the API does when the HTTP request is gone
    batch.step()
    assert "leaves" in out and batch.active == 1
    while batch.active:
        batch.step()
    assert out["leaves"].completion_tokens < out["stays"].completion_tokens
