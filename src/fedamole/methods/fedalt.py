"""FedALT (Bian, Wang, Zhang and Xu, AAAI 2026, arXiv 2503.11880, "FedALT: Federated Fine-Tuning
through Adaptive Local Training with Rest-of-World LoRA") on two named PEFT LoRA adapters and a
per-token router over them.

- **Individual LoRA** (adapter ``local``): each client keeps training its own LoRA, round after
  round, from where it left it; it is never re-initialised from an aggregate (the paper's break
  with FedAvg). It is the only thing a client uploads.
- **Rest-of-World LoRA** (adapter ``row``): what the server sends client i is the mean of the
  *other* clients' individual LoRAs, ``A_row = mean_{j != i} A_j`` and
  ``B_row = mean_{j != i} B_j`` (each matrix averaged, as FedIT averages its LoRA and as the
  authors' code does). It is frozen in local training: no gradient ever reaches it.
- **Adaptive mixer**: in every adapted module a router ``W_g`` (d_in -> 2, no bias) scores each
  token's input x, and ``h = W0 x + g_local(x) s B_i A_i x + g_row(x) s B_row A_row x`` with
  ``(g_local, g_row) = softmax(W_g x)`` and s = alpha / r (the paper's MoE-style mixer, per token
  and per module). The router trains with the individual LoRA and never leaves the client.

Choices where the paper leaves room, each what its text (or the authors' code) implies:

- The server keeps every client's last upload; the RoW averages, unweighted (the paper's
  1 / (N - 1)), every *other* client that has uploaded at least once. Before anyone else has
  uploaded (round 0) the RoW is the seeded LoRA init, B = 0: it adds nothing. Under partial
  participation a client's last upload keeps counting (the paper has every client in every
  round). ``federation.weighted_aggregation`` is therefore refused.
- The router is initialised as ``nn.Linear`` (Kaiming-uniform, the authors' code), from the run
  seed, identically on every client; the individual LoRA starts from the seeded PEFT init.
- A client's model is evaluated after aggregation: its individual LoRA and router as trained,
  with the RoW the server has just computed from this round's uploads. A round ends with the
  server sending each client its new RoW, and the authors' code scores each client with it
  loaded; so the model evaluated (and saved, and served) holds the others' latest knowledge.
- Budget: ``federation.local_steps`` steps of the shared loop on the individual LoRA and the
  router, with FedAMoLE's LoRA rank, alpha, dropout and target modules, like every baseline here
  (the authors' code: rank 8, alpha 32, q and v projections, AdamW).

The router rides on PEFT's own LoRA forward: a pre-hook on each LoRA layer sets the two
adapters' scalings to the per-token gates times alpha / r (PEFT multiplies each adapter's output
by its scaling, which broadcasts over tokens), so the adapters stay plain PEFT LoRA. The router
itself is stored as a third PEFT adapter, ``router``, of rank 2, whose ``A`` is the router's
weight; it is never active (its ``B`` stays 0 and is neither kept nor sent), so PEFT moves,
saves and exports it with the LoRAs (FedLEASE stores its router the same way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedamole.aggregation import aggregate
from fedamole.config import Config, ConfigError, HMoLEConfig
from fedamole.data.pipeline import ClientDataset
from fedamole.federation.training import StepCallback
from fedamole.methods.peft_method import (
    AdapterHandle,
    LoraHandle,
    PeftMethod,
    PeftRuntime,
    Phase,
    adapter_key,
    lora_config,
)
from fedamole.types import ClientPayload, ClientUpdate, Metrics, ServerState, StateDict

LOCAL, ROW = "local", "row"  # the client's individual LoRA and its Rest-of-World LoRA
MIXED = (LOCAL, ROW)  # the router's outputs, in order
ROUTER = "router"  # a never-active PEFT adapter whose lora_A (2 x d_in) is each layer's router
UPLOADS = "client"  # server store: client c's last upload under "client/<c>/<local key>"


def trained_key(key: str) -> bool:
    """What local training updates and the client keeps: its individual LoRA and its router."""
    return adapter_key(LOCAL)(key) or adapter_key(ROUTER)(key)


def unused_router_b(key: str) -> bool:
    return key.startswith(f"{ROUTER}/") and ".lora_B." in key


def router_config(h: HMoLEConfig) -> LoraConfig:
    """The router as a LoRA on the same modules: A (2 x d_in, PEFT's init = a bias-free
    nn.Linear's) is its weight; B stays 0 and the adapter is never active."""
    rank = len(MIXED)
    return dataclasses.replace(lora_config(h), r=rank, lora_alpha=rank, lora_dropout=0.0)


class RoutedLoraHandle(LoraHandle):
    """The individual and Rest-of-World LoRAs mixed per token by the router adapter's ``A`` in
    every LoRA layer; the router's unused ``B`` is no tensor of the handle."""

    def __init__(self, model: PeftModel) -> None:
        super().__init__(model, (*MIXED, ROUTER))
        self.params = {k: p for k, p in self.params.items() if not unused_router_b(k)}

    @contextmanager
    def mixing(self, weights: dict[str, float]) -> Iterator[None]:
        """Both LoRAs active, each token's output of LoRA k scaled by
        ``weights[k] * g_k(x) * alpha / r`` with g = softmax(router(x)) of that layer."""
        if set(weights) != set(MIXED):
            raise ValueError(f"the router mixes {MIXED} together, got {weights}")
        with super().mixing(weights):
            hooks = [layer.register_forward_pre_hook(gating(weights)) for layer in self.layers]
            try:
                yield
            finally:
                for hook in hooks:
                    hook.remove()


def gating(weights: dict[str, float]) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
    """A pre-hook that sets a LoRA layer's scalings to its router's per-token gates on this
    input (PEFT multiplies each adapter's output by its scaling, which broadcasts over tokens)."""

    def gate(layer: nn.Module, args: tuple[Tensor, ...]) -> None:
        router = layer.lora_A[ROUTER]
        logits = router(args[0].to(router.weight.dtype))
        gates = torch.softmax(logits, dim=-1, dtype=torch.float32)
        for i, adapter in enumerate(MIXED):
            scale = weights[adapter] * layer.lora_alpha[adapter] / layer.r[adapter]
            layer.scaling[adapter] = gates[..., i : i + 1] * scale

    return gate


class FedALT(PeftMethod):
    """Individual LoRA trained and kept by each client, frozen leave-one-out Rest-of-World LoRA
    from the server, a local per-token router mixing them (see module doc)."""

    def __init__(self) -> None:
        super().__init__(
            "fedalt",
            shared=adapter_key(LOCAL),  # uploaded (and kept: see client_round)
            phases=(Phase({LOCAL: 1.0, ROW: 1.0}, trained_key),),
            evaluates_after_aggregation=True,
            shares_personal_model=False,  # the router never leaves the client
            adapters=(LOCAL, ROW),
        )

    def check(self, cfg: Config) -> None:
        if cfg.federation.weighted_aggregation:
            raise ConfigError(
                "federation.weighted_aggregation=true: fedalt's Rest-of-World LoRA is the plain "
                "mean of the other clients' LoRAs, as in the paper; set it to false"
            )

    def attach(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: Config
    ) -> AdapterHandle:
        """Both LoRAs (A Kaiming-uniform, B = 0), then the router adapter."""
        lora = super().attach(model, tokenizer, cfg)
        lora.model.add_adapter(ROUTER, router_config(cfg.hmole))
        return RoutedLoraHandle(lora.model)

    def runtime(
        self,
        handle: AdapterHandle,
        tokenizer: PreTrainedTokenizerBase,
        cfg: Config,
        data: ClientDataset,
    ) -> PeftRuntime:
        """A client starts with the run's seeded individual LoRA and router, its own from then."""
        private = {k: v for k, v in self.initial.items() if trained_key(k)}
        return PeftRuntime(handle, tokenizer, cfg, data, private)

    # ----------------------------------------------------------------- server side
    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        """The Rest-of-World LoRA: the mean of the other clients' last uploads (the seeded
        init, B = 0, while none has uploaded)."""
        template = initial_local(state.store)
        others = [
            ClientUpdate(c, upload, num_examples=1)
            for c, upload in uploads(state.store).items()
            if c != client_id
        ]
        mean, _ = aggregate(template, others)
        row = {f"{ROW}/{key.removeprefix(f'{LOCAL}/')}": value for key, value in mean.items()}
        return ClientPayload(round=state.round, architecture={}, weights=row, lr=state.lr)

    def complete_round(
        self,
        cfg: Config,
        state: ServerState,
        updates: list[ClientUpdate],
        next_participants: list[int],
    ) -> tuple[ServerState, Metrics]:
        """Keep each client's individual LoRA as its last upload (a broken upload is rejected,
        as aggregation rejects it, and the client's previous one stays)."""
        template = initial_local(state.store)
        store = dict(state.store)
        for update in updates:
            screened, rejected = aggregate(template, [update])
            if not rejected:
                store |= {f"{UPLOADS}/{update.client_id}/{k}": screened[k] for k in template}
        lr = state.lr * cfg.optim.lr_decay
        return ServerState(state.round + 1, store, lr, next_participants), {}

    def describe(self, cfg: Config, payload: ClientPayload) -> dict[str, object]:
        router = f"PEFT adapter {ROUTER!r}, rank {len(MIXED)}: its lora_A is each layer's router"
        return {**super().describe(cfg, payload), "router": router}

    def inference(self) -> str:
        return (
            "h = W0 x + g_local(x) * local + g_row(x) * row (each LoRA at alpha / r), "
            f"(g_local, g_row) = softmax(W x) per token, W = the layer's lora_A of adapter {ROUTER}"
        )

    def answer_doc(self, runtime: PeftRuntime) -> dict[str, object]:
        """The rule only: the adapters' weights are the router's, per token."""
        return {"rule": self.inference()}

    # ----------------------------------------------------------------- client side
    def client_round(
        self, payload: ClientPayload, runtime: PeftRuntime, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Train the individual LoRA and the router beside the frozen RoW; keep both, upload
        the individual LoRA."""
        update = super().client_round(payload, runtime, on_step)
        runtime.private = {k: v for k, v in runtime.private.items() if adapter_key(ROUTER)(k)}
        runtime.private |= update.weights
        return update


def initial_local(store: StateDict) -> StateDict:
    """The seeded individual LoRA the server started from (its keys are every upload's)."""
    return {k: v for k, v in store.items() if adapter_key(LOCAL)(k)}


def uploads(store: StateDict) -> dict[int, StateDict]:
    """Each client's last uploaded individual LoRA, by client id."""
    out: dict[int, StateDict] = {}
    for key, value in store.items():
        if key.startswith(f"{UPLOADS}/"):
            client, local_key = key.removeprefix(f"{UPLOADS}/").split("/", 1)
            out.setdefault(int(client), {})[local_key] = value
    return out
