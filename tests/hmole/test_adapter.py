"""Injection, architectures and state I/O of an HMoLE model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from fedamole.hmole import inject_hmole
from fedamole.models import load_base_model


def _random_state(adapter, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in adapter.state().items()}


def test_default_targets_are_q_and_v_of_every_layer(tiny_model):
    model, _ = tiny_model
    adapter = inject_hmole(model)
    assert adapter.modules == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert len(inject_hmole(load_base_model("tiny-random-llama")[0], "all-linear").modules) == 14


def test_unknown_target_lists_available_modules(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match=r"qkv_proj.*'down_proj'.*'v_proj'"):
        inject_hmole(model, ["qkv_proj"])


def test_state_round_trips_bit_exactly_through_safetensors(tiny_model):
    model, _ = tiny_model
    adapter = inject_hmole(model)
    adapter.set_architecture({m: [1, 4, 6] for m in adapter.modules})
    state = _random_state(adapter, seed=1)
    adapter.load_state(state)
    restored = load(save(adapter.state()))
    assert restored.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(restored[key], tensor), key


def test_load_state_requires_every_tensor(tiny_model):
    model, _ = tiny_model
    adapter = inject_hmole(model)
    adapter.set_architecture({m: [0, 1] for m in adapter.modules})
    state = adapter.state()
    state.pop(next(iter(state)))
    with pytest.raises(KeyError, match="lacks 1"):
        adapter.load_state(state)


def test_architecture_must_cover_every_module(tiny_model):
    model, _ = tiny_model
    adapter = inject_hmole(model)
    with pytest.raises(ValueError, match="missing"):
        adapter.set_architecture({adapter.modules[0]: [0, 1]})


def test_shared_backbone_swaps_clients_like_separate_models(tiny_model):
    """Two clients with different expert sets on one backbone == two separately built models."""
    model, tok = tiny_model
    batch = tok(["swap experts in and out", "ok"], return_tensors="pt", padding=True)
    arch_a = {m: [0, 1] for m in inject_hmole(load_base_model("tiny-random-llama")[0]).modules}
    arch_b = {m: [2, 5, 7] if i % 2 else [1, 3] for i, m in enumerate(arch_a)}

    separate = []
    for arch, seed in ((arch_a, 1), (arch_b, 2)):
        own_model, _ = load_base_model("tiny-random-llama")
        own = inject_hmole(own_model, dropout=0.0)
        own.set_architecture(arch)
        own.load_state(_random_state(own, seed))
        with torch.no_grad():
            separate.append((own.state(), own_model(**batch).logits))

    shared = inject_hmole(model, dropout=0.0)
    for _ in range(2):  # swap back and forth: nothing of the other client may linger
        for arch, (state, logits) in zip((arch_a, arch_b), separate, strict=True):
            shared.set_architecture(arch)
            shared.load_state(state)
            with torch.no_grad():
                assert torch.equal(model(**batch).logits, logits)


def test_global_state_init(tiny_model):
    model, _ = tiny_model
    adapter = inject_hmole(model)
    store = adapter.init_global_state(num_experts=5, seed=3)
    assert len(store) == len(adapter.modules) * (5 * 2 + 3)
    module = adapter.modules[0]
    a0, a1 = store[f"{module}.experts.0.lora_A"], store[f"{module}.experts.1.lora_A"]
    assert not torch.equal(a0, a1) and a0.abs().max() <= 1 / 64**0.5
    assert store[f"{module}.experts.0.lora_B"].abs().sum() == 0
    assert all(torch.equal(v, adapter.init_global_state(5, 3)[k]) for k, v in store.items())


def test_one_batch_serves_each_row_with_its_own_clients_experts(tiny_model):
    """Rows of one batch kept under different clients (different expert counts) get the logits
    each client's own model gives them alone; and the clients really differ."""
    model, tok = tiny_model
    adapter = inject_hmole(model, dropout=0.0)
    arch_a = {m: [0, 1] for m in adapter.modules}
    arch_b = {m: [2, 5, 7] if i % 2 else [1, 3] for i, m in enumerate(arch_a)}
    prompts = ["swap experts in and out", "ok", "a third prompt, longer than the others"]
    alone = {}
    for key, arch, seed in (("a", arch_a, 1), ("b", arch_b, 2)):
        adapter.set_architecture(arch)
        adapter.load_state(_random_state(adapter, seed))
        adapter.keep(key)
        with torch.no_grad():
            for prompt in prompts:
                alone[key, prompt] = model(**tok([prompt], return_tensors="pt")).logits[0, -1]
    assert not torch.allclose(alone["a", "ok"], alone["b", "ok"], atol=1e-3)

    tok.padding_side = "left"
    keys = ["b", "a", "b"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), adapter.rows(keys) as extra:
        mixed = model(**batch, **extra).logits[:, -1]
    assert adapter.context.row_groups is None  # the per-row mode ends with the block
    for row, (key, prompt) in enumerate(zip(keys, prompts, strict=True)):
        torch.testing.assert_close(mixed[row], alone[key, prompt], atol=1e-4, rtol=1e-4)
    model.train()
    with pytest.raises(RuntimeError, match="inference only"), adapter.rows(keys) as extra:
        model(**batch, **extra)
