"""FedLEASE: the clustering of clients by their LoRA B (on constructed B matrices and on a short
tiny-model run with two known client groups), experts averaged within their cluster only, and
adaptive top-M routing that always uses the client's own expert."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_methods import federation  # sibling module: the same stepping harness
from tiny_run import TINY_RUN

import fedamole
from fedamole.config import ConfigError, load_config
from fedamole.data.pipeline import prepare_client_splits
from fedamole.evaluation import fitting_indices, rouge_l_scores
from fedamole.methods.fedlease import (
    CLUSTER_KEY,
    LABELS_KEY,
    ROUTER,
    FedLEASE,
    b_distances,
    cluster_clients,
    expert,
    expert_gates,
)
from fedamole.reporting import RunDir
from fedamole.serving import export_client, load_client_model
from fedamole.serving.loading import CLIENT_FOLDER
from fedamole.transports.in_process import run_in_process
from fedamole.types import ClientUpdate

GROUPS = ["federation.num_clients=4", "data.partition=groups", "data.num_groups=2"]


def constructed_b(groups: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per client, two modules' B: its group's direction plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (16, 4), "v": (8, 4)}
    centres = {m: [torch.randn(s, generator=gen) for _ in set(groups)] for m, s in shapes.items()}
    return [
        {m: centres[m][g] + 0.3 * torch.randn(shapes[m], generator=gen) for m in shapes}
        for g in groups
    ]


def test_distance_is_the_cosine_distance_of_each_modules_b_averaged_over_modules():
    q, v = torch.randn(6, 2), torch.randn(3, 2)
    v_orthogonal = torch.stack([v[:, 1], -v[:, 0]], dim=1) * 5  # <v, v_orth> = 0, any norm
    v_orthogonal -= (v_orthogonal * v).sum() / v.square().sum() * v
    clients = [{"q": q, "v": v}, {"q": 2 * q, "v": v_orthogonal}, {"q": -q, "v": -v}]
    distances = b_distances(clients)
    assert distances[0, 1] == pytest.approx(0.5)  # same direction in q, orthogonal in v
    assert distances[0, 2] == pytest.approx(2.0)  # opposite in both
    assert (distances == distances.T).all() and (distances.diagonal() == 0).all()


def test_clustering_recovers_two_constructed_groups_and_picks_two_clusters():
    groups = [0, 1, 1, 0, 0, 1, 0]
    assert cluster_clients(constructed_b(groups), max_clusters=4).tolist() == groups


def test_clustering_recovers_three_groups_when_there_are_three():
    groups = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert cluster_clients(constructed_b(groups, seed=1), max_clusters=4).tolist() == groups


def test_two_clients_are_two_clusters_and_one_client_is_one():
    assert cluster_clients(constructed_b([0, 0])).tolist() == [0, 1]
    assert cluster_clients(constructed_b([0])).tolist() == [0]


@pytest.mark.parametrize("experts", [2, 3, 4])
def test_gates_always_include_the_own_expert_and_sum_to_one(experts):
    slots = 2 * experts - 1
    logits = torch.randn(2000, slots, generator=torch.Generator().manual_seed(experts))
    for own in range(experts):
        adversarial = logits.clone()
        adversarial[:, own] = -10.0  # the own expert's slots the least likely
        adversarial[:, experts:] = -10.0
        for case in (logits, adversarial):
            gates = expert_gates(case, own)
            assert gates.shape == (2000, experts)
            assert (gates[:, own] > 0).all()
            torch.testing.assert_close(gates.sum(-1), torch.ones(2000))
    favoured = torch.zeros(1, slots)
    favoured[0, experts:] = 5.0  # every extra slot of expert 0 on top
    favoured[0, 0] = 5.0
    torch.testing.assert_close(expert_gates(favoured, 0)[0], torch.eye(experts)[0])


def test_every_client_must_take_part_in_every_round():
    cfg = load_config(None, ["federation.num_clients=4", "federation.clients_per_round=2"])
    with pytest.raises(ConfigError, match="federation.clients_per_round"):
        FedLEASE().check(cfg)


def by_cluster(updates: list[ClientUpdate], labels: list[int], cluster: int) -> list[ClientUpdate]:
    return [u for u in updates if labels[u.client_id] == cluster]


def test_a_short_run_clusters_the_known_groups_and_averages_each_expert_in_its_cluster():
    fed = federation("fedlease", *GROUPS, "federation.rounds=3", "federation.local_steps=4")
    assert fed.method.warmup_rounds(fed.cfg) == 1

    warmup = fed.play()  # round 0: each client's own LoRA, all uploaded for the allocation
    labels = fed.state.store[LABELS_KEY].tolist()
    assert labels == [0, 1, 0, 1]  # data.partition=groups deals client c to group c % 2
    for cluster in (0, 1):
        members = by_cluster(warmup, labels, cluster)
        for key in warmup[0].weights:
            mean = torch.stack([u.weights[key] for u in members]).mean(0)
            expert_key = key.replace("default/", f"{expert(cluster)}/", 1)
            torch.testing.assert_close(fed.state.store[expert_key], mean)

    before = dict(fed.state.store)
    clustered = fed.play()  # round 1: own expert and router trained, the expert alone sent
    for update in clustered:
        mine = f"{expert(labels[update.client_id])}/"
        assert update.weights and all(k.startswith(mine) for k in update.weights)
    for cluster in (0, 1):
        members = by_cluster(clustered, labels, cluster)
        for key in members[0].weights:
            mean = torch.stack([u.weights[key] for u in members]).mean(0)
            torch.testing.assert_close(fed.state.store[key], mean)
            assert not torch.equal(fed.state.store[key], before[key])  # it learnt
    routers = [
        {k: v for k, v in c.private.items() if k.startswith(f"{ROUTER}/")} for c in fed.clients
    ]
    assert routers[0] and all(not torch.equal(routers[0][k], routers[1][k]) for k in routers[0])


def test_the_served_model_routes_through_the_own_expert_and_restores_exactly():
    fed = federation("fedlease", *GROUPS, "federation.rounds=2")
    fed.play()
    fed.play()
    client = fed.clients[1]
    fed.evaluate(1)
    own = int(client.private[CLUSTER_KEY][0])
    examples = client.data.splits.test[:2]
    ids = torch.tensor([client.data.prompter.prompt_ids(examples[0])])

    own_gates = []
    layers = [m for m in fed.handle.model.modules() if isinstance(m, LoraLayer)]

    def capture(layer: LoraLayer, _args: tuple) -> None:
        own_gates.append(layer.scaling[expert(own)])  # set by the routing hook just before

    ((context, members),) = fed.method.answer_groups(client, examples)
    assert members == [0, 1]
    with context, torch.no_grad():
        hooks = [layer.register_forward_pre_hook(capture) for layer in layers]
        served = fed.handle.model(input_ids=ids).logits
        for hook in hooks:
            hook.remove()
    assert len(own_gates) == len(layers)
    assert all(isinstance(g, torch.Tensor) and (g > 0).all() for g in own_gates)

    saved = fed.method.personal_model(client)
    fresh = federation("fedlease", *GROUPS, "federation.rounds=2")  # a new model, as serving
    restored = fresh.clients[1]
    fresh.method.restore(restored, saved, {})
    fresh.handle.model.eval()  # as serving rebuilds it
    ((context, _),) = fresh.method.answer_groups(restored, examples)
    with context, torch.no_grad():
        torch.testing.assert_close(fresh.handle.model(input_ids=ids).logits, served)


def test_a_clustered_run_serves_each_client_as_evaluated_and_exports_its_router(tmp_path):
    run = tmp_path / "run"
    settings = [*TINY_RUN, "model.device=cpu", "federation.rounds=2", f"output.dir={run}"]
    run_in_process(load_config(None, settings), method="fedlease")
    rows = [
        r for r in RunDir(run).read_example_scores() if r["client"] == 1 and r["split"] == "test"
    ]
    recorded = max(rows, key=lambda r: r["round"])["rougeL"]

    model = load_client_model(run, 1, device="cpu")
    cfg = load_config(run / "config.yaml")
    test = prepare_client_splits(cfg)[1].splits.test
    kept = [test[i] for i in fitting_indices(model.prompter, test, cfg.model.max_length)]
    answers = model.generate(
        [ex.instruction for ex in kept],
        [ex.input for ex in kept],
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )
    assert recorded and rouge_l_scores(answers, [ex.output for ex in kept]) == recorded

    folder = export_client(run, 1, tmp_path / "export").folder
    assert {p.name for p in folder.iterdir() if p.is_dir()} == {
        expert(0),
        expert(1),
        ROUTER,
        CLIENT_FOLDER,
    }
    mixing = json.loads((folder / "mixing.json").read_text())
    assert mixing["router_adapter"] == ROUTER and mixing["experts"] == 2
    assert "load_pretrained" in (folder / "README.md").read_text()
    exported = fedamole.load_pretrained(folder, device="cpu")  # rebuilt through FedLEASE
    answers = exported.generate(
        [ex.instruction for ex in kept],
        [ex.input for ex in kept],
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )
    assert rouge_l_scores(answers, [ex.output for ex in kept]) == recorded
