"""Client-side RSEA embeddings, hand-computed on the tiny model."""

from __future__ import annotations

import torch

from fedamole.hmole import inject_hmole
from fedamole.rsea.embeddings import compute_embeddings


def test_embeddings_are_means_over_non_padding_tokens(tiny_model):
    model, tok = tiny_model
    adapter = inject_hmole(model, dropout=0.05)
    adapter.set_architecture(
        {m: [0, 3] if i % 2 else [1, 2, 4] for i, m in enumerate(adapter.modules)}
    )
    batch = tok(["routing data", "a longer auxiliary sentence"], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()

    inputs: dict[str, list[torch.Tensor]] = {m: [] for m in adapter.modules}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, name=name: inputs[name].append(args[0]))
        for name, layer in adapter.layers.items()
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()

    model.train()  # the pass must switch dropout off itself and restore the mode
    emb = compute_embeddings(adapter, [dict(batch)])
    assert model.training
    keep = batch["attention_mask"].bool()
    for name, layer in adapter.layers.items():
        x = inputs[name][0][keep]  # (tokens, d_in), padding removed
        torch.testing.assert_close(emb.data[name], (x @ layer.router_weight.T).mean(0))
        assert sorted(emb.experts[name]) == layer.expert_ids
        for i, e in enumerate(layer.expert_ids):
            torch.testing.assert_close(emb.experts[name][e], (x @ layer.expert_A[i].T).mean(0))
        assert emb.data[name].shape == (adapter.rank,)
