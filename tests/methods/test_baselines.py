"""The paper's remaining baselines on the tiny random Llama: FedPrompt and FedPTuning (what
travels is exactly the prompt, averaged; the backbone never moves) and FDLoRA (global LoRA
uploaded and stepped by the server, personal LoRA private, AdaFusion of the two)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_methods import Federation, federation  # sibling module: the same stepping harness
from torch import nn

from fedamole.config import load_config
from fedamole.data.example import Example
from fedamole.data.prompts import build_prompter
from fedamole.data.tokenize import collate, encode_labelled
from fedamole.evaluation import choice_losses
from fedamole.methods.fdlora import (
    FUSION_BOUND,
    FUSION_EXAMPLES,
    FUSION_KEY,
    L1_PENALTY,
    START_SIMPLEX,
    adaptive_fusion,
    fusion_loss,
)
from fedamole.methods.fedprompt import FedPrompt
from fedamole.types import ClientUpdate

TOKENS = 4
PROMPT_KEYS = {
    "fedprompt": {"default/prompt_encoder.embedding.weight"},
    "fedptuning": {"default/prompt_encoder.embedding.weight"}
    | {f"default/prompt_encoder.mlp_head.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")},
}


def mean_upload(updates: list[ClientUpdate], key: str) -> torch.Tensor:
    return torch.stack([u.weights[key] for u in updates]).mean(0)


def backbone(fed: Federation) -> dict[str, nn.Parameter]:
    """Every parameter of the model that is not an adapter tensor."""
    adapter = {id(p) for p in fed.handle.params.values()}
    return {n: p for n, p in fed.handle.model.named_parameters() if id(p) not in adapter}


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@pytest.mark.parametrize("name", ["fedprompt", "fedptuning"])
def test_prompt_methods_upload_exactly_the_prompt_and_serve_its_average(name):
    fed = federation(name, f"baselines.num_virtual_tokens={TOKENS}")
    frozen = snapshot(backbone(fed))
    initial = fed.method.initial
    updates = fed.play()

    assert all(set(u.weights) == PROMPT_KEYS[name] for u in updates)
    table = updates[0].weights["default/prompt_encoder.embedding.weight"]
    assert table.shape == (TOKENS, fed.handle.model.config.hidden_size)
    for key in PROMPT_KEYS[name]:
        assert not torch.equal(updates[0].weights[key], initial[key])  # it learnt
        assert not torch.equal(updates[0].weights[key], updates[1].weights[key])
        torch.testing.assert_close(fed.state.store[key], mean_upload(updates, key))
    assert not any(p.requires_grad for p in backbone(fed).values())

    metrics = fed.evaluate(0)  # served the aggregate, scored after aggregation
    assert metrics["test_num_examples"] == len(fed.clients[0].data.splits.test)
    loaded = fed.handle.state()
    assert all(torch.equal(loaded[k], fed.state.store[k]) for k in PROMPT_KEYS[name])
    after = snapshot(backbone(fed))
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)


def test_prompt_tuning_from_text_starts_at_the_texts_token_embeddings():
    fed = federation(
        "fedprompt",
        f"baselines.num_virtual_tokens={TOKENS}",
        "baselines.prompt_tuning_init=text",
        "baselines.prompt_tuning_init_text=abc",
    )
    ids = fed.clients[0].tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3  # byte-level: one token a byte, so 4 virtual tokens = a, b, c, a
    words = fed.handle.model.get_input_embeddings().weight
    expected = words[torch.tensor([*ids, ids[0]])]
    torch.testing.assert_close(
        fed.method.initial["default/prompt_encoder.embedding.weight"], expected
    )


def test_choice_scoring_of_a_prompt_model_reads_the_inputs_positions():
    """The virtual tokens' logits come first; each choice's loss must equal the model's own
    loss for that one sequence (PEFT pads the labels of the virtual tokens with -100)."""
    cfg = load_config(
        None,
        [
            "model.name=tiny-random-llama",
            "model.dtype=float32",
            f"baselines.num_virtual_tokens={TOKENS}",
        ],
    )
    method = FedPrompt()
    handle, tokenizer = method.build(cfg)
    model = handle.model
    choices = ("yes", "no, it is green")  # different lengths: the batch is right-padded
    example = Example("Is the sky blue?", "", "yes", "q", choices=choices)
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    losses = choice_losses(model, prompter, [example], batch_size=2)[0]
    model.eval()
    with torch.no_grad():
        for choice, loss in zip(choices, losses, strict=True):
            pair = encode_labelled(prompter, replace(example, output=choice))
            batch = collate([pair], tokenizer.pad_token_id)
            assert model(**batch).loss.item() == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------------------------------- FDLoRA
def global_keys(fed: Federation) -> set[str]:
    return {k for k in fed.method.initial if k.startswith("global/")}


def test_fdlora_uploads_only_the_global_lora_and_keeps_a_personal_copy_private():
    fed = federation("fdlora")
    payload = fed.method.payload(fed.state, 0)
    assert set(payload.weights) == global_keys(fed)  # the server's momentum stays there
    updates = fed.play()
    assert all(set(u.weights) == global_keys(fed) for u in updates)
    for key in global_keys(fed):  # round 0: plain FedAvg
        torch.testing.assert_close(fed.state.store[key], mean_upload(updates, key))
    for runtime, update in zip(fed.clients, updates, strict=True):
        personal = {k: v for k, v in runtime.private.items() if k.startswith("personal/")}
        assert personal.keys() == {k.replace("global/", "personal/") for k in global_keys(fed)}
        for key, value in personal.items():  # synchronised: the LoRA it just trained
            assert torch.equal(value, update.weights[key.replace("personal/", "global/")])
    b = next(k for k in fed.clients[0].private if ".lora_B." in k)
    assert not torch.equal(fed.clients[0].private[b], fed.clients[1].private[b])
    assert fed.method.shares_personal_model is False


def test_fdlora_server_takes_nesterov_sgd_steps_on_the_averaged_outer_gradient():
    """From round 1 on: torch's own SGD (Nesterov, momentum 0.5, lr 1) with gradient
    theta - mean(uploads) gives the new global LoRA; the personal LoRA is not re-synchronised."""
    fed = federation("fdlora")
    fed.play()
    keys = sorted(global_keys(fed))
    reference = [nn.Parameter(fed.state.store[k].clone()) for k in keys]
    optimizer = torch.optim.SGD(reference, lr=1.0, momentum=0.5, nesterov=True)
    personal_after_sync = dict(fed.clients[0].private)
    for _ in range(2):  # two steps: the second one uses the momentum of the first
        updates = fed.play()
        for param, key in zip(reference, keys, strict=True):
            param.grad = param.detach() - mean_upload(updates, key)
        optimizer.step()
        for param, key in zip(reference, keys, strict=True):
            torch.testing.assert_close(fed.state.store[key], param.detach())
    personal = {k: v for k, v in fed.clients[0].private.items() if k.startswith("personal/")}
    assert all(torch.equal(v, personal_after_sync[k]) for k, v in personal.items())


def test_fdlora_synchronises_a_client_in_the_first_period_round_it_takes_part_in():
    fed = federation("fdlora", "baselines.fdlora_sync_every=2")
    first, second = fed.clients[:2]
    fed.play([first])  # round 0: the second client is not sampled
    untouched = {k: v for k, v in second.private.items() if k.startswith("personal/")}
    assert all(torch.equal(v, fed.method.initial[k]) for k, v in untouched.items())
    updates = fed.play([first, second])  # round 1: same period for the first, new for the second
    for runtime, update, synced in ((first, updates[0], 0), (second, updates[1], 1)):
        assert runtime.private["sync/round"].tolist() == [synced]
        b = next(k for k in update.weights if ".lora_B." in k)
        copied = torch.equal(runtime.private[b.replace("global/", "personal/")], update.weights[b])
        assert copied == (synced == 1)
    fed.play([first])  # round 2: a new period
    assert first.private["sync/round"].tolist() == [2]


def fusion_objective(runtime, weights: tuple[float, float]) -> float:
    batch = collate(runtime.data.aux[:FUSION_EXAMPLES], runtime.tokenizer.pad_token_id)
    penalty = L1_PENALTY * float(np.abs(weights).mean())
    return fusion_loss(runtime, batch, np.array(weights)) + penalty


@pytest.mark.parametrize("harmful", ["personal", "global"])
def test_adaptive_fusion_turns_down_a_harmful_lora(harmful):
    """Big random B matrices make one LoRA wreck the model: the search must give it (almost) no
    weight, and its choice must score no worse than any starting point."""
    fed = federation("fdlora")
    fed.play()
    runtime = fed.clients[0]
    payload = fed.method.payload(fed.state, 0)
    state = {**runtime.private, **payload.weights}
    noise = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.startswith(f"{harmful}/") and ".lora_B." in k]:
        state[key] = 10 * torch.randn(state[key].shape, generator=noise)
    runtime.handle.load(state)

    weights = adaptive_fusion(runtime)
    w_global, w_personal = weights.tolist()
    assert (weights.abs() <= FUSION_BOUND).all()
    assert abs(w_personal if harmful == "personal" else w_global) < 0.25
    chosen = fusion_objective(runtime, (w_global, w_personal))
    assert all(chosen <= fusion_objective(runtime, start) for start in START_SIMPLEX)


def test_fdlora_personal_model_holds_both_loras_and_the_fusion_weights(tmp_path):
    fed = federation("fdlora")
    fed.play()
    runtime = fed.clients[0]
    payload = fed.method.payload(fed.state, 0)
    metrics = fed.method.evaluate(payload, runtime).metrics
    assert "test_rougeL" in metrics

    personal = fed.method.personal_model(runtime)
    assert set(personal) == set(fed.method.initial) | {FUSION_KEY}
    assert all(torch.equal(personal[k], v) for k, v in payload.weights.items())
    assert personal[FUSION_KEY].shape == (2,) and (personal[FUSION_KEY].abs() <= FUSION_BOUND).all()
    save_file(personal, str(tmp_path / "adapter.safetensors"))
    loaded = load_file(str(tmp_path / "adapter.safetensors"))
    assert all(torch.equal(loaded[k], personal[k]) for k in personal)
    doc = fed.method.describe(fed.cfg, payload)
    assert doc["adapters"] == ["global", "personal"] and FUSION_KEY in str(doc["inference"])
