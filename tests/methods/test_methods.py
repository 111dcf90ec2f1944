"""Each method's update rule on the tiny random Llama, driven through the FederatedMethod seam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tiny_run import TINY_RUN

from fedamole.config import Config, load_config
from fedamole.data.pipeline import encode_client, prepare_client_splits
from fedamole.data.prompts import build_prompter
from fedamole.federation.client import score_split
from fedamole.federation.method import ClientRuntime, FederatedMethod
from fedamole.methods import get_method
from fedamole.methods.fedamole import rsea_architectures
from fedamole.methods.feddpa import MAX_LOCAL_WEIGHT, local_weights
from fedamole.rsea.scoring import held_mask
from fedamole.types import ClientUpdate, Metrics, ServerState, payload_nbytes, update_nbytes

TINY = [*TINY_RUN, "federation.num_clients=3", "federation.rounds=3", "hmole.num_experts=6"]


@dataclass
class Federation:
    """A method with its clients, stepped round by round as the engine steps it."""

    cfg: Config
    method: FederatedMethod
    handle: Any
    clients: list[ClientRuntime]
    state: ServerState
    traffic: int = 0

    def play(self, clients: list[ClientRuntime] | None = None) -> list[ClientUpdate]:
        """One round for ``clients`` (default: all); the server state moves on."""
        updates = []
        for runtime in clients or self.clients:
            payload = self.method.payload(self.state, runtime.data.client_id)
            update = self.method.client_round(payload, runtime)
            self.traffic += payload_nbytes(payload) + update_nbytes(update)
            updates.append(update)
        self.state, _ = self.method.complete_round(
            self.cfg, self.state, updates, self.state.participants
        )
        return updates

    def evaluate(self, client: int) -> Metrics:
        """The aggregated model, as the engine asks a method that serves it."""
        payload = self.method.payload(self.state, client)
        return self.method.evaluate(payload, self.clients[client]).metrics


def federation(name: str, *extra: str) -> Federation:
    method = get_method(name)
    cfg = method.configure(load_config(None, [*TINY, *extra]))
    handle, tokenizer = method.build(cfg)
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    clients = [
        method.runtime(handle, tokenizer, cfg, encode_client(cid, s, prompter, 512))
        for cid, s in enumerate(prepare_client_splits(cfg))
    ]
    state = method.init_state(cfg, handle, list(range(len(clients))))
    return Federation(cfg, method, handle, clients, state)


def _mean(updates: list[ClientUpdate], key: str) -> torch.Tensor:
    return torch.stack([u.weights[key] for u in updates]).mean(0)


def test_fedit_aggregate_is_the_mean_of_client_loras_and_is_what_clients_are_scored_with():
    fed = federation("fedit")
    before = fed.state.store
    updates = fed.play()
    store = fed.state.store
    assert set(store) == set(before) and any(".lora_A." in k for k in store)
    assert not torch.equal(
        updates[0].weights[next(iter(store))], updates[1].weights[next(iter(store))]
    )
    for key in store:
        torch.testing.assert_close(store[key], _mean(updates, key))
    assert not any(k.startswith("test_") for k in updates[0].metrics)  # scored after aggregation
    metrics = fed.evaluate(1)
    assert "test_rougeL" in metrics
    loaded = fed.handle.state()
    assert all(torch.equal(loaded[k], store[k]) for k in store)


def test_fedit_ft_scores_each_client_after_its_local_training():
    fed = federation("fedit-ft")
    updates = fed.play()
    assert all("test_rougeL" in u.metrics for u in updates)
    assert not fed.method.evaluates_after_aggregation


def test_ffa_lora_never_changes_a_and_only_b_travels():
    fed = federation("ffa-lora")
    initial = fed.method.initial
    a_keys = [k for k in initial if ".lora_A." in k]
    for _ in range(2):
        updates = fed.play()
        assert all(".lora_B." in k for u in updates for k in u.weights)
        for runtime in fed.clients:
            assert sorted(runtime.private) == sorted(a_keys)
            assert all(torch.equal(runtime.private[k], initial[k]) for k in a_keys)
    assert all(".lora_B." in k for k in fed.state.store)
    assert any(fed.state.store[k].abs().sum() > 0 for k in fed.state.store)  # B did learn


def test_local_never_communicates_and_each_client_depends_only_on_its_own_data():
    fed = federation("local")
    for _ in range(2):
        fed.play()
    assert fed.traffic == 0 and fed.state.store == {}
    together = fed.clients[0].private

    alone = federation("local")  # same client 0, the other clients never train
    for _ in range(2):
        alone.play(alone.clients[:1])
    assert together.keys() == alone.clients[0].private.keys()
    assert all(torch.equal(together[k], alone.clients[0].private[k]) for k in together)
    assert not all(torch.equal(together[k], fed.clients[1].private[k]) for k in together)


def test_feddpa_keeps_the_local_adapter_out_of_aggregation():
    fed = federation("feddpa")
    initial = fed.method.initial
    updates = fed.play()
    global_keys = {k for k in initial if k.startswith("global/")}
    assert global_keys and all(set(u.weights) == global_keys for u in updates)
    assert set(fed.state.store) == global_keys
    for key in global_keys:
        torch.testing.assert_close(fed.state.store[key], _mean(updates, key))
    local_b = next(k for k in initial if k.startswith("local/") and ".lora_B." in k)
    privates = [runtime.private for runtime in fed.clients]
    assert all(set(p) == set(initial) - global_keys for p in privates)
    assert not torch.equal(privates[0][local_b], initial[local_b])  # the local adapter trained
    assert not torch.equal(privates[0][local_b], privates[1][local_b])  # ...on its own data

    metrics = fed.evaluate(0)
    test = fed.clients[0].data.splits.test
    assert metrics["test_num_examples"] == len(test)
    scores = score_split(fed.method, fed.clients[0], test)  # per example, in the split order
    assert scores.example_indices == list(range(len(test)))
    assert {k: len(v) for k, v in scores.values.items()} == {
        "rougeL": len(test),
        "exact_match": len(test),
    }
    assert metrics["test_rougeL"] == pytest.approx(sum(scores.values["rougeL"]) / len(test))
    weights = local_weights(fed.clients[0], test)
    assert ((weights >= 0) & (weights <= MAX_LOCAL_WEIGHT)).all()


def test_fedamole_r_keeps_its_round_zero_assignment():
    fed = federation("fedamole-r")
    assert fed.cfg.rsea.mode == "random"
    round_zero = fed.state.architectures
    for _ in range(2):
        fed.play()
        assert fed.state.architectures == round_zero


def test_fedamole_h_gives_every_client_the_same_expert_count():
    fed = federation("fedamole-h")
    for _ in range(2):
        archs = fed.state.architectures.values()
        counts = {sum(len(experts) for experts in arch.values()) for arch in archs}
        per_module = {tuple(len(arch[m]) for m in arch) for arch in archs}
        assert len(counts) == 1 and len(per_module) == 1
        fed.play()


def test_fedamole_c_keeps_more_of_its_holders_than_rsea_from_the_same_round():
    """From the same uploads, the continuity objective keeps at least as much of this round's
    assignment (weighted by each expert's score spread) as plain RSEA, which the optimality of
    both assignments implies; the method runs it when rsea.mode is continuity."""
    fed = federation("fedamole-c")
    assert fed.cfg.rsea.mode == "continuity"
    before, modules = fed.state.architectures, list(next(iter(fed.state.architectures.values())))
    embeddings = {u.client_id: u.embeddings for u in fed.play()}
    clients = sorted(before)
    args = (modules, clients, embeddings, fed.cfg.hmole.rank, before)
    sticky, scores = rsea_architectures(fed.cfg, *args)
    plain, _ = rsea_architectures(
        fed.cfg.model_copy(update={"rsea": fed.cfg.rsea.model_copy(update={"mode": "rsea"})}), *args
    )
    assert fed.state.architectures == sticky
    held = held_mask(modules, fed.cfg.hmole.num_experts, clients, before)
    weight = scores.std(axis=-1, keepdims=True) * held

    def kept(archs):
        return (weight * held_mask(modules, fed.cfg.hmole.num_experts, clients, archs)).sum()

    assert kept(sticky) >= kept(plain) - 1e-12


@pytest.mark.parametrize("name", ["ffa-lora", "feddpa", "fedit"])
def test_personal_model_is_the_aggregate_with_the_private_part(name):
    fed = federation(name)
    fed.play()
    client = fed.clients[0]
    fed.method.evaluate(fed.method.payload(fed.state, 0), client)
    expected = {**client.private, **fed.state.store}
    personal = fed.method.personal_model(client)
    assert personal.keys() == expected.keys()
    assert all(torch.equal(personal[k], expected[k]) for k in expected)
    assert fed.method.shares_personal_model == (name != "feddpa")


def _uploaded_embeddings(*extra: str) -> torch.Tensor:
    """Client 0's uploaded data embeddings after round 0 of a fresh run with these settings."""
    fed = federation("fedamole", "privacy.enabled=true", *extra)
    update = fed.method.client_round(fed.method.payload(fed.state, 0), fed.clients[0])
    return torch.stack(list(update.embeddings.data.values()))


def test_privacy_noise_is_unpredictable_from_the_run_seed():
    """The server knows the run seed, the round and the client: it must not be able to redraw
    the noise. Same run seed twice -> different noise; only privacy.seed (tests) repeats it."""
    assert not torch.equal(_uploaded_embeddings(), _uploaded_embeddings())
    assert torch.equal(
        _uploaded_embeddings("privacy.seed=5"), _uploaded_embeddings("privacy.seed=5")
    )


def test_embedding_norms_are_logged_and_stay_private_under_privacy():
    fed = federation("fedamole")
    update = fed.method.client_round(fed.method.payload(fed.state, 0), fed.clients[0])
    vectors = list(update.embeddings.data.values())
    vectors += [v for by_expert in update.embeddings.experts.values() for v in by_expert.values()]
    assert update.metrics["emb_norm_max"] == pytest.approx(
        max(torch.linalg.vector_norm(v).item() for v in vectors)
    )
    private = federation("fedamole", "privacy.enabled=true")
    update = private.method.client_round(
        private.method.payload(private.state, 0), private.clients[0]
    )
    assert "emb_clipped_share" in update.metrics and "emb_norm_max" not in update.metrics
