"""Pools of served models: methods served one client at a time (FedDPA's per-prompt mix) and
exported folders answer as `fedamole generate`, also when fewer models than they serve may be
loaded at once; per-row pools answer mixed batches; per-row adapters refuse training mode."""

from __future__ import annotations

import pytest
import torch
from serving_cases import MAX_TOKENS, PROMPTS

from fedamole.federation.method import PerRowHandle
from fedamole.serving import export_client, load_client_model
from fedamole.serving.decoding import DecodeRow
from fedamole.serving.personalised import request_examples
from fedamole.serving.pool import ExportPool, RunPool


def test_one_client_at_a_time_methods_and_exports_answer_as_generate(runs, tmp_path):
    """FedDPA (its per-prompt mix) is served one client at a time on the shared backbone, an
    exported folder as its own model: both answer as `fedamole generate`, with every model
    loaded or with one at a time (the others read again from disk when asked for)."""
    feddpa = runs["feddpa"]
    expected = [
        load_client_model(feddpa, i % 3).generate(p, max_new_tokens=MAX_TOKENS)[0]
        for i, p in enumerate(PROMPTS)
    ]
    for max_loaded in (None, 1):
        pool = RunPool(feddpa, max_loaded=max_loaded)
        assert pool.continuous_batch() is None and pool.needs_instruction("client-0")
        rows = [
            DecodeRow(f"client-{i % 3}", [], MAX_TOKENS, example=request_examples(p)[0])
            for i, p in enumerate(PROMPTS)
        ]
        for row in rows:
            row.prompt_ids = pool.prompter(row.served).prompt_ids(row.example)
        assert [a.text for a in pool.answer(rows)] == expected
        assert len(pool.resident.loaded) == (4 if max_loaded is None else 1)

    folders = [
        export_client(runs["fedit"], c, tmp_path / f"fedit-client-{c}").folder for c in (2, 3)
    ]
    exported = ExportPool(folders, max_loaded=1)
    for c in (2, 3, 2):
        name = f"fedit-client-{c}"
        row = DecodeRow(
            name,
            exported.prompter(name).chat_ids([{"role": "user", "content": PROMPTS[0]}]),
            MAX_TOKENS,
        )
        answer = load_client_model(runs["fedit"], c).generate(PROMPTS[0], max_new_tokens=MAX_TOKENS)
        assert exported.answer([row])[0].text == answer[0]
        assert list(exported.resident.loaded) == [name]


@pytest.mark.parametrize("method", ["fedamole", "fedit"])
def test_per_row_adapters_refuse_training_mode(runs, method):
    """As PEFT refuses ``adapter_names`` in training, so does every per-row handle."""
    pool = RunPool(runs[method], [0, 1])
    handle = pool.handle
    assert isinstance(handle, PerRowHandle)
    handle.model.train()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with (
        pytest.raises(RuntimeError, match="inference only"),
        handle.rows(["client-0", "client-1"]) as extra,
    ):
        handle.model(input_ids=ids, **extra)
    handle.model.eval()
    with torch.no_grad(), handle.rows(["client-0", "client-1"]) as extra:
        assert handle.model(input_ids=ids, **extra).logits.shape[0] == 2


@pytest.mark.parametrize("method", ["fedamole", "fedit"])
def test_a_per_row_pool_answers_a_mixed_batch_in_one_generate(method, served, generated):
    """Whole batches (the decoder ``fedamole generate`` uses) over several clients' kept
    adapters, with fewer loaded at once than the pool serves: each row its client's answer."""
    pool = RunPool(served[method], max_loaded=3)
    prompter = pool.prompter("client-0")
    jobs = [(c, PROMPTS[c]) for c in (3, 0, 2)]
    rows = [
        DecodeRow(f"client-{c}", prompter.chat_ids([{"role": "user", "content": p}]), MAX_TOKENS)
        for c, p in jobs
    ]
    assert [a.text for a in pool.answer(rows)] == [generated[method, c, p] for c, p in jobs]
    assert sorted(pool.resident.loaded) == ["client-0", "client-2", "client-3"]
