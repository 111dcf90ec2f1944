"""FedLEASE (Wang, Bian, Zhang and Xu, NeurIPS 2025, arXiv 2509.15087, "Adaptive LoRA Experts
Allocation and Selection for Federated Fine-Tuning") on named PEFT LoRA adapters.

- **Warm-up** (rounds 0 .. W-1): each client trains one LoRA of its own, from the run's seeded
  init, on its own data; nothing is averaged. In round W-1 every client uploads it.
- **Allocation** (the server, after round W-1): the distance of clients i and j is the cosine
  distance of their flattened LoRA ``B`` matrices, averaged over the adapted modules
  (:func:`b_distances`); agglomerative clustering with average linkage on it, the number of
  clusters the one of 2 .. ``max_clusters`` with the best silhouette (:func:`cluster_clients`).
  Cluster g gets expert g, the mean of its members' warm-up LoRAs (A and B).
- **Clustered rounds** (W on): every client holds all M experts and a router of its own per
  module; it trains its own cluster's expert and its router (the other experts frozen) and
  uploads that expert only, so the server averages expert g over cluster g alone. The router
  never leaves the client.
- **Adaptive top-M routing** (:func:`expert_gates`): the router maps a token to 2M - 1 logits,
  one per expert and M - 1 more for the client's own expert; the top M of their softmax,
  renormalised, are the gates, each slot's weight going to its expert. At most M - 1 of the top M
  can be other experts, so the own expert is always used, possibly through several slots (its
  weight then their sum), and a client uses between 1 and M distinct experts per token.

Settings. The authors' defaults are 5 warm-up rounds of 25, at most 4 clusters and LoRA rank 4
(their public code: ``--warmup_rounds 5 --global_rounds 25 --max_clusters 4 --rank 4``). Here the
warm-up is the same share of the run, ``max(1, round(federation.rounds / 5))`` (``warmup_share``),
so a 25-round run warms up for 5; ``max_clusters`` is 4, capped by the number of clients less one
(silhouette needs fewer clusters than clients; two clients are two clusters); every expert has
the harness's shared LoRA settings (``hmole.rank``, alpha, dropout, targets), as every baseline,
rather than the paper's r = 4 for RoBERTa. A run that ends within its warm-up never clusters (nothing would use it).

Choices the paper leaves open, as its text and code imply: the warm-up LoRAs all start from the
run's one seeded init, so averaging them is meaningful; the router (a bias-free linear map, the
code's init) is drawn per client from the run seed when the client first sees the experts;
clients are evaluated after aggregation (the averaged experts with their own router), so in
round W-1 a client is evaluated with the new experts and its untrained router. Every client
must take part in every round (``federation.clients_per_round`` unset): the allocation clusters
all of them. A client whose warm-up upload was lost (a node failure) joins the largest cluster.

The router is stored as an extra PEFT LoRA adapter ``router`` of rank 2M - 1 whose ``A`` is the
router's weight; it is never active (its ``B`` stays 0 and is neither kept nor sent), so PEFT
moves, saves and loads it with the experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedamole.aggregation import aggregate
from fedamole.config import Config, ConfigError, HMoLEConfig
from fedamole.data.example import Example
from fedamole.data.pipeline import ClientDataset
from fedamole.federation.client import evaluate_client
from fedamole.federation.method import AnswerGroup, ClientRuntime, FederatedMethod
from fedamole.federation.training import StepCallback, round_seed
from fedamole.hmole.layer import lora_uniform_
from fedamole.methods.peft_method import (
    DEFAULT,
    LoraHandle,
    flat_parameters,
    lora_config,
    train_adapters,
)
from fedamole.models import build_base_model
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    ServerState,
    StateDict,
)

WARMUP_SHARE = 5 / 25  # the paper's 5 warm-up rounds of 25
MAX_CLUSTERS = 4  # the paper's (and its code's) largest number of experts
ROUTER = "router"
CLUSTER_KEY = "fedlease/cluster"  # int64 [own cluster g, number of experts M], to each client
LABELS_KEY = "fedlease/labels"  # server store: int64 cluster of each client id
COSINE_EPS = 1e-8  # the authors' guard for an all-zero B


def expert(index: int) -> str:
    return f"expert{index}"


# ---------------------------------------------------------------------------------- allocation
def b_distances(b_matrices: Sequence[Mapping[str, Tensor]]) -> np.ndarray:
    """Client x client distances: 1 - cosine similarity of each module's flattened ``B``, averaged
    over the modules (every client must have the same module keys)."""
    modules = sorted(b_matrices[0])
    if any(sorted(b) != modules for b in b_matrices):
        raise ValueError("every client's B matrices must cover the same modules")
    distances = np.zeros((len(b_matrices), len(b_matrices)))
    for module in modules:
        flat = torch.stack([b[module].double().flatten() for b in b_matrices])  # (clients, -1)
        norms = flat.norm(dim=-1)
        cosine = flat @ flat.T / (norms[:, None] * norms[None, :] + COSINE_EPS)
        distances += (1 - cosine).numpy() / len(modules)
    np.fill_diagonal(distances, 0.0)
    return (distances + distances.T) / 2  # exactly symmetric, as linkage needs


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a clustering from precomputed distances (a client alone in its cluster
    scores 0, as in scikit-learn); needs 2 .. n - 1 clusters."""
    scores = []
    for i, own in enumerate(labels):
        mates = (labels == own) & (np.arange(len(labels)) != i)
        if not mates.any():
            scores.append(0.0)
            continue
        inside = distances[i, mates].mean()
        nearest = min(distances[i, labels == other].mean() for other in set(labels) - {own})
        scores.append((nearest - inside) / max(inside, nearest))
    return float(np.mean(scores))


def cluster_clients(
    b_matrices: Sequence[Mapping[str, Tensor]], max_clusters: int = MAX_CLUSTERS
) -> np.ndarray:
    """Each client's cluster (0 .. M - 1, numbered in order of first client): average-linkage
    agglomerative clustering of :func:`b_distances`, M in 2 .. ``max_clusters`` with the best
    silhouette (the fewest on a tie). Silhouette needs M < clients, so two clients are two
    clusters and one client is one."""
    count = len(b_matrices)
    if count <= 2:
        return np.arange(count)
    distances = b_distances(b_matrices)
    tree = linkage(squareform(distances, checks=False), method="average")
    candidates = [
        _numbered(fcluster(tree, k, criterion="maxclust"))
        for k in range(2, min(max_clusters, count - 1) + 1)
    ]
    scores = [silhouette(distances, labels) for labels in candidates]
    return candidates[int(np.argmax(scores))]


def _numbered(labels: np.ndarray) -> np.ndarray:
    """Cluster labels renumbered 0, 1, ... in order of their first client."""
    order = {label: i for i, label in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[label] for label in labels.tolist()])


# ---------------------------------------------------------------------------------- routing
def expert_gates(logits: Tensor, own: int) -> Tensor:
    """Adaptive top-M gates (..., M) from router logits (..., 2M - 1): slots 0 .. M-1 are the
    experts, slots M .. 2M-2 more copies of expert ``own``; the top M slots' softmax weights,
    renormalised, are added to their experts (see module doc)."""
    slots = logits.shape[-1]
    if slots % 2 == 0:
        raise ValueError(f"the router needs 2M - 1 logits, got {slots}")
    count = (slots + 1) // 2
    top, picked = logits.float().softmax(-1).topk(count, dim=-1)
    slot_expert = torch.arange(slots, device=logits.device)
    slot_expert[count:] = own
    gates = top.new_zeros(*logits.shape[:-1], count)
    return gates.scatter_add_(-1, slot_expert[picked], top / top.sum(-1, keepdim=True))


def router_config(h: HMoLEConfig, num_experts: int) -> LoraConfig:
    """The router as a never-active LoRA on the experts' modules: A (2M - 1 x d_in) is its
    weight (PEFT's init is the bias-free linear map's), B stays 0."""
    return dataclasses.replace(
        lora_config(h), r=2 * num_experts - 1, lora_alpha=2 * num_experts - 1, lora_dropout=0.0
    )


def _kept(name: str) -> bool:
    """The tensors a client holds: every LoRA tensor but the router's unused B."""
    return ".lora_" in name and f".lora_B.{ROUTER}." not in name


class LeaseHandle(LoraHandle):
    """The backbone with the warm-up LoRA (``default``), then the M experts and the router."""

    def __init__(self, model: PeftModel, settings: HMoLEConfig) -> None:
        super().__init__(model, (DEFAULT,))
        self.settings = settings

    @property
    def num_experts(self) -> int:
        return len(self.adapters) - 1 if ROUTER in self.adapters else 0

    def set_experts(self, count: int) -> None:
        """Replace the warm-up LoRA with ``count`` experts and a router (once per run)."""
        if self.num_experts == count:
            return
        if self.num_experts:
            raise ValueError(f"this model has {self.num_experts} experts, not {count}")
        experts = tuple(expert(e) for e in range(count))
        for name in experts:
            self.model.add_adapter(name, lora_config(self.settings))
        self.model.add_adapter(ROUTER, router_config(self.settings, count))
        self.model.set_adapter(experts[0])  # PEFT's generate reads the model's own choice
        self.model.delete_adapter(DEFAULT)
        self.model.train(self.model.training)  # new dropout modules take the model's mode
        self.adapters = (*experts, ROUTER)
        self.params = flat_parameters(self.model, self.adapters, _kept)

    def fresh_router(self, seed: int) -> StateDict:
        """A router drawn from ``seed``: LoRA's (and nn.Linear's) Kaiming-uniform init."""
        generator = torch.Generator().manual_seed(seed)
        return {
            key: lora_uniform_(torch.empty(param.shape), generator)
            for key, param in self.params.items()
            if key.startswith(f"{ROUTER}/")
        }

    @contextmanager
    def routing(self, own: int) -> Iterator[None]:
        """Run with the experts mixed per token by each module's router (:func:`expert_gates`),
        ``own`` the client's cluster: each expert's PEFT scaling becomes its gate times alpha/r
        for the length of one forward."""
        experts = [expert(e) for e in range(self.num_experts)]
        self.model.base_model.set_adapter(experts)
        hooks = [hook for layer in self.layers for hook in _gating(layer, experts, own)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


def _gating(layer: LoraLayer, experts: list[str], own: int) -> list:
    """Hooks that scale each expert of ``layer`` by its gate during a forward, then restore."""
    scales = {name: layer.scaling[name] for name in experts}
    router = layer.lora_A[ROUTER]

    def before(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].to(router.weight.dtype)
        gates = expert_gates(router(x), own)
        for e, name in enumerate(experts):
            layer.scaling[name] = gates[..., e : e + 1] * scales[name]

    def after(_module: nn.Module, _args: tuple[Tensor, ...], _output: Tensor) -> None:
        layer.scaling.update(scales)

    return [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]


LeaseRuntime = ClientRuntime[LeaseHandle]


def router_seed(seed: int, client_id: int) -> int:
    """Each client's router init, from the run seed (round -1: no training round uses it)."""
    return round_seed(seed, -1, client_id)


# ---------------------------------------------------------------------------------- the method
class FedLEASE(FederatedMethod[LeaseHandle]):
    """FedLEASE: warm-up, B-similarity clustering, one expert per cluster, adaptive top-M."""

    name = "fedlease"
    evaluates_after_aggregation = True
    shares_personal_model = False  # the router never leaves the client

    def __init__(self, max_clusters: int = MAX_CLUSTERS, warmup_share: float = WARMUP_SHARE):
        if max_clusters < 2:
            raise ValueError(f"fedlease needs max_clusters >= 2, got {max_clusters}")
        if not 0 < warmup_share <= 1:
            raise ValueError(f"fedlease's warmup_share must be in (0, 1], got {warmup_share}")
        self.max_clusters = max_clusters
        self.warmup_share = warmup_share
        self.initial: StateDict = {}

    def warmup_rounds(self, cfg: Config) -> int:
        return max(1, round(cfg.federation.rounds * self.warmup_share))

    def clusters_after(self, cfg: Config, round_idx: int) -> bool:
        """Whether the server allocates the experts after this round (the warm-up's last, when
        rounds follow it)."""
        warmup = self.warmup_rounds(cfg)
        return round_idx == warmup - 1 and warmup < cfg.federation.rounds

    def notes(self) -> dict[str, object]:
        return {"fedlease_max_clusters": self.max_clusters}

    def check(self, cfg: Config) -> None:
        if cfg.federation.clients_per_round is not None:
            raise ConfigError(
                f"fedlease clusters every client after its warm-up, so every client takes part in "
                f"every round: unset federation.clients_per_round "
                f"(got {cfg.federation.clients_per_round})"
            )

    def build(self, cfg: Config) -> tuple[LeaseHandle, PreTrainedTokenizerBase]:
        model, tokenizer = build_base_model(cfg)
        torch.manual_seed(cfg.seed)  # the warm-up LoRA's init, the same on every client
        handle = LeaseHandle(get_peft_model(model, lora_config(cfg.hmole), DEFAULT), cfg.hmole)
        self.initial = handle.state()
        return handle, tokenizer

    def runtime(
        self,
        handle: LeaseHandle,
        tokenizer: PreTrainedTokenizerBase,
        cfg: Config,
        data: ClientDataset,
    ) -> LeaseRuntime:
        """A client starts its warm-up from the run's seeded LoRA."""
        return LeaseRuntime(handle, tokenizer, cfg, data, dict(self.initial))

    # ------------------------------------------------------------------------------ server side
    def init_state(self, cfg: Config, handle: LeaseHandle, participants: list[int]) -> ServerState:
        """The warm-up needs nothing from the server."""
        return ServerState(0, {}, cfg.optim.lr, participants)

    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        """Nothing in the warm-up; then every expert and the client's cluster."""
        weights: StateDict = {}
        if LABELS_KEY in state.store:
            labels = state.store[LABELS_KEY]
            weights = {k: v for k, v in state.store.items() if k != LABELS_KEY}
            weights[CLUSTER_KEY] = torch.tensor([int(labels[client_id]), int(labels.max()) + 1])
        return ClientPayload(round=state.round, architecture={}, weights=weights, lr=state.lr)

    def complete_round(
        self,
        cfg: Config,
        state: ServerState,
        updates: list[ClientUpdate],
        next_participants: list[int],
    ) -> tuple[ServerState, Metrics]:
        """Clustered rounds: each expert averaged over the clients that sent it (its cluster).
        The warm-up's last round: the allocation."""
        store, metrics = state.store, {}
        if LABELS_KEY in store:
            store, _ = aggregate(store, updates, cfg.federation.weighted_aggregation)
        elif self.clusters_after(cfg, state.round):
            store, metrics = self.allocate(cfg, updates)
        lr = state.lr * cfg.optim.lr_decay
        return ServerState(state.round + 1, store, lr, next_participants), metrics

    def allocate(self, cfg: Config, updates: list[ClientUpdate]) -> tuple[StateDict, Metrics]:
        """Cluster the warm-up LoRAs by their B; expert g = the mean of cluster g's LoRAs."""
        lora_b = [{k: v for k, v in u.weights.items() if ".lora_B." in k} for u in updates]
        found = cluster_clients(lora_b, self.max_clusters)
        labels = torch.full((cfg.federation.num_clients,), int(np.bincount(found).argmax()))
        labels[[u.client_id for u in updates]] = torch.from_numpy(found)
        count = int(found.max()) + 1
        renamed = [
            dataclasses.replace(u, weights=_as_expert(u.weights, int(g)))
            for u, g in zip(updates, found, strict=True)
        ]
        zeros = {k: torch.zeros_like(v) for k, v in updates[0].weights.items()}
        empty = {key: value for g in range(count) for key, value in _as_expert(zeros, g).items()}
        experts, _ = aggregate(empty, renamed, cfg.federation.weighted_aggregation)
        return {**experts, LABELS_KEY: labels}, {"fedlease_experts": count}

    def describe(self, cfg: Config, payload: ClientPayload) -> dict[str, object]:
        return {
            "base_model": cfg.model.name,
            "lora": cfg.hmole.model_dump(
                mode="json", include={"rank", "alpha", "dropout", "target_modules"}
            ),
            "keys": "<adapter>/<PEFT parameter name without the adapter name>",
            "cluster": f"{CLUSTER_KEY} = [own cluster, number of experts] (absent: warm-up)",
            "inference": self.inference(),
        }

    @staticmethod
    def inference() -> str:
        return (
            "warm-up: the client's own LoRA at full weight; after it, h = W0 x + sum_e g_e(x) "
            "B_e A_e x alpha / r over the experts, g = adaptive top-M gates of the router "
            f"(adapter {ROUTER!r}, its lora_A the 2M - 1 x d_in weight): top M of softmax(W x) "
            "renormalised, slots M .. 2M-2 adding to the client's own expert"
        )

    # ------------------------------------------------------------------------------ client side
    def client_round(
        self, payload: ClientPayload, runtime: LeaseRuntime, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Warm-up: train the own LoRA (uploaded in the warm-up's last round). Then: train the
        own cluster's expert and the router; upload that expert."""
        handle = runtime.handle
        if CLUSTER_KEY in payload.weights:
            own = self._load_experts(payload, runtime)
            mine = f"{expert(own)}/"
            loss = _train(runtime, handle.routing(own), payload, on_step, mine, ROUTER)
            trained = handle.state()
            upload = {k: v for k, v in trained.items() if k.startswith(mine)}
            runtime.private |= {k: v for k, v in trained.items() if k.startswith(f"{ROUTER}/")}
        else:
            handle.load(runtime.private)
            loss = _train(runtime, handle.mixing({DEFAULT: 1.0}), payload, on_step, DEFAULT)
            runtime.private = handle.state()
            shared = self.clusters_after(runtime.cfg, payload.round)
            upload = dict(runtime.private) if shared else {}
        return ClientUpdate(
            client_id=runtime.data.client_id,
            weights=upload,
            num_examples=len(runtime.data.train),
            metrics={"train_loss": loss},
        )

    def _load_experts(self, payload: ClientPayload, runtime: LeaseRuntime) -> int:
        """The experts into the handle with the client's router (drawn on first use); returns
        the client's cluster."""
        handle, cfg = runtime.handle, runtime.cfg
        own, count = payload.weights[CLUSTER_KEY].tolist()
        handle.set_experts(count)
        router = {k: v for k, v in runtime.private.items() if k.startswith(f"{ROUTER}/")}
        if not router:
            router = handle.fresh_router(router_seed(cfg.seed, runtime.data.client_id))
        runtime.private = {**router, CLUSTER_KEY: payload.weights[CLUSTER_KEY]}
        handle.load({**router, **payload.weights})
        return own

    def evaluate(self, payload: ClientPayload, runtime: LeaseRuntime) -> ClientEvaluation:
        """The averaged experts with the client's router (its own LoRA in the warm-up)."""
        if CLUSTER_KEY in payload.weights:
            self._load_experts(payload, runtime)
        else:
            runtime.handle.load(runtime.private)
        metrics, scores = evaluate_client(self, runtime)
        return ClientEvaluation(runtime.data.client_id, metrics, scores)

    def personal_model(self, runtime: LeaseRuntime) -> StateDict:
        """The adapters as evaluated and, after the warm-up, the client's cluster."""
        cluster = {k: v for k, v in runtime.private.items() if k == CLUSTER_KEY}
        return {**runtime.handle.state(), **cluster}

    # ------------------------------------------------------------------------------ serving
    def answer_groups(self, runtime: LeaseRuntime, examples: list[Example]) -> list[AnswerGroup]:
        """All at once: routed over the experts, or the warm-up LoRA alone."""
        handle = runtime.handle
        if CLUSTER_KEY in runtime.private:
            context = handle.routing(int(runtime.private[CLUSTER_KEY][0]))
        else:
            context = handle.mixing({DEFAULT: 1.0})
        return [(context, list(range(len(examples))))]

    def answer_doc(self, runtime: LeaseRuntime) -> dict[str, object]:
        doc: dict[str, object] = {"rule": self.inference()}
        if CLUSTER_KEY in runtime.private:
            own, count = runtime.private[CLUSTER_KEY].tolist()
            doc |= {"own_expert": expert(own), "experts": count, "router_adapter": ROUTER}
        return doc

    def restore(
        self, runtime: LeaseRuntime, model: StateDict, description: Mapping[str, object]
    ) -> None:
        """The saved adapters into the handle (the experts and router, when it has a cluster)."""
        if CLUSTER_KEY in model:
            runtime.handle.set_experts(int(model[CLUSTER_KEY][1]))
        runtime.handle.load(model)
        runtime.private = dict(model)


def _as_expert(weights: StateDict, cluster: int) -> StateDict:
    """Warm-up LoRA tensors under expert ``cluster``'s keys."""
    prefix = f"{DEFAULT}/"
    return {f"{expert(cluster)}/{k.removeprefix(prefix)}": v for k, v in weights.items()}


def _train(
    runtime: LeaseRuntime,
    context: AbstractContextManager[object],
    payload: ClientPayload,
    on_step: StepCallback | None,
    *trained: str,
) -> float:
    """The round's local steps on the tensors whose key starts with one of ``trained``."""
    seed = round_seed(runtime.cfg.seed, payload.round, runtime.data.client_id)

    def rule(key: str) -> bool:
        return key.startswith(trained)

    return train_adapters(runtime, context, rule, payload.lr, seed, on_step)
