"""FedSA-LoRA (share A, keep B) and the capacity-matched FedIT on the tiny random Llama."""

from __future__ import annotations

import torch
from test_methods import federation  # sibling module: the same stepping harness

from fedamole.hmole.keys import state_keys


def test_fedsa_lora_sends_no_b_and_leaves_each_client_the_common_a_and_its_own_b():
    fed = federation("fedsa-lora")
    for _ in range(2):
        updates = fed.play()
        assert not any(".lora_B." in k for u in updates for k in u.weights)
        assert all(".lora_A." in k for u in updates for k in u.weights)
    payload_keys = set(fed.method.payload(fed.state, 0).weights)
    assert payload_keys and all(".lora_A." in k for k in payload_keys)

    models = []
    for client in range(len(fed.clients)):
        fed.method.evaluate(fed.method.payload(fed.state, client), fed.clients[client])
        models.append(fed.method.personal_model(fed.clients[client]))
    a_keys = [k for k in models[0] if ".lora_A." in k]
    b_keys = [k for k in models[0] if ".lora_B." in k]
    assert a_keys and b_keys
    for model in models:
        assert all(torch.equal(model[k], fed.state.store[k]) for k in a_keys)  # the common A
    assert all(models[0][k].abs().sum() > 0 for k in b_keys)  # B learnt
    assert not all(torch.equal(models[0][k], models[1][k]) for k in b_keys)  # each its own
    for client, model in enumerate(models):
        private = fed.clients[client].private
        assert all(torch.equal(model[k], private[k]) for k in b_keys)
    assert not fed.method.shares_personal_model


def _fedamole_mean_trainable(*extra: str) -> float:
    """Parameters a FedAMoLE client trains, averaged over the clients of a round, as RSEA
    actually assigned them (after one round's reassignment)."""
    fed = federation("fedamole", *extra)
    fed.play()
    architectures = fed.method.architectures(fed.state)
    tensors = {
        k: v.numel()
        for k, v in fed.handle.init_global_state(fed.cfg.hmole.num_experts, fed.cfg.seed).items()
    }
    counts = [sum(tensors[k] for k in state_keys(a)) for a in architectures.values()]
    return sum(counts) / len(counts)


def test_fedit_wide_trains_as_many_parameters_per_client_as_fedamole_does():
    for extra in ([], ["hmole.num_experts=6", "rsea.clients_per_expert=1"]):
        fed = federation("fedit-wide", *extra)
        trained = sum(p.numel() for p in fed.handle.params.values())
        target = _fedamole_mean_trainable(*extra)
        assert abs(trained - target) <= 0.1 * target, (trained, target)
        notes = fed.method.notes()
        assert notes["trainable_per_client"] == trained
        assert notes["lora_rank"] > fed.cfg.hmole.rank
        describe = fed.method.describe(fed.cfg, fed.method.payload(fed.state, 0))
        assert describe["lora"]["rank"] == notes["lora_rank"]
