"""Inject HMoLE into a model and drive it: the client's architecture, its trainable state, and
swapping states in and out so one frozen backbone serves many simulated clients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fedamole.device import model_device
from fedamole.hmole.keys import expert_key, router_key, shared_key, state_keys
from fedamole.hmole.layer import EmbeddingSums, HMoLELinear, RoutingContext, lora_uniform_
from fedamole.types import Architecture, StateDict

ALL_LINEAR = "all-linear"


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers that may be adapted: everything but the output head, as PEFT does."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Full names of the linear modules matched by name suffixes (or 'all-linear')."""
    linear = _linear_modules(model)
    if targets == ALL_LINEAR:
        return list(linear)
    if isinstance(targets, str):
        targets = [targets]
    available = sorted({name.rsplit(".", 1)[-1] for name in linear})
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if unknown:
        raise ValueError(
            f"hmole.target_modules: no linear module matches {unknown}; "
            f"linear modules in this model: {available} (or use 'all-linear')"
        )
    return [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]


def linear_shapes(model: nn.Module, targets: list[str] | str) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of each target linear module, in model order."""
    linear = _linear_modules(model)
    return [
        (linear[n].in_features, linear[n].out_features) for n in resolve_targets(model, targets)
    ]


class HMoLEAdapter:
    """Handle on a model whose target linears were replaced by :class:`HMoLELinear`."""

    def __init__(self, model: nn.Module, layers: dict[str, HMoLELinear], context: RoutingContext):
        self.model = model
        self.layers = layers
        self.context = context

    # ----------------------------------------------------------------- introspection
    @property
    def modules(self) -> list[str]:
        """Names of the adapted modules, in model order."""
        return list(self.layers)

    @property
    def rank(self) -> int:
        return next(iter(self.layers.values())).rank

    @property
    def architecture(self) -> Architecture:
        return {name: list(layer.expert_ids) for name, layer in self.layers.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Two stacked tensors per module (experts, shared expert and router together)."""
        return [p for layer in self.layers.values() for p in (layer.down, layer.up)]

    # ----------------------------------------------------------------- architecture and state
    def set_architecture(self, architecture: Architecture) -> None:
        """Give every module its client-specific expert set without touching the backbone."""
        missing = set(self.layers) - set(architecture)
        extra = set(architecture) - set(self.layers)
        if missing or extra:
            raise ValueError(
                f"architecture does not match the adapted modules: "
                f"missing {sorted(missing)[:3]}, unknown {sorted(extra)[:3]}"
            )
        for name, ids in architecture.items():
            self.layers[name].set_experts(ids)

    def state(self) -> StateDict:
        """The client's trainable state (local experts, shared expert, router) as detached float32
        CPU copies: the server's store, aggregation and checkpoints stay off the accelerator."""
        out: StateDict = {}
        for name, layer in self.layers.items():
            a_keys, b_keys = _stacked_keys(name, layer.expert_ids)
            down = layer.down.detach().to("cpu", torch.float32)
            up = layer.up.detach().to("cpu", torch.float32)
            blocks = {k: a.t() for k, a in zip(a_keys, down.split(layer.rank, 1), strict=True)}
            blocks |= {k: b.t() for k, b in zip(b_keys, up.split(layer.rank), strict=True)}
            for key in state_keys({name: layer.expert_ids}):
                out[key] = blocks[key].clone(memory_format=torch.contiguous_format)
        return out

    @torch.no_grad()
    def load_state(self, state: StateDict) -> None:
        """Load every tensor the current architecture needs (from any device or dtype); all must
        be present with the right shape."""
        missing = set(self.state_keys()) - set(state)
        if missing:
            raise KeyError(f"state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for name, layer in self.layers.items():
            a_keys, b_keys = _stacked_keys(name, layer.expert_ids)
            a_shape, b_shape = (layer.rank, layer.in_features), (layer.out_features, layer.rank)
            layer.down.copy_(
                torch.cat([_checked(state, key, a_shape, layer.down) for key in a_keys]).t()
            )
            layer.up.copy_(
                torch.cat([_checked(state, key, b_shape, layer.up) for key in b_keys], 1).t()
            )

    def state_keys(self) -> list[str]:
        return state_keys(self.architecture)

    def init_global_state(self, num_experts: int, seed: int) -> StateDict:
        """Fresh server-side state for all N_e experts of every module (SPEC 2 init): A and the
        router Kaiming-uniform, B = 0, each expert independently, from one seeded generator."""
        gen = torch.Generator().manual_seed(seed)
        out: StateDict = {}
        for name, layer in self.layers.items():
            r, d_in, d_out = layer.rank, layer.in_features, layer.out_features
            for e in range(num_experts):
                out[expert_key(name, e, "A")] = lora_uniform_(torch.empty(r, d_in), gen)
                out[expert_key(name, e, "B")] = torch.zeros(d_out, r)
            out[shared_key(name, "A")] = lora_uniform_(torch.empty(r, d_in), gen)
            out[shared_key(name, "B")] = torch.zeros(d_out, r)
            out[router_key(name)] = lora_uniform_(torch.empty(r, d_in), gen)
        return out

    # ----------------------------------------------------------------- several clients per batch
    def keep(self, key: str) -> None:
        """Keep the current client's adapter under ``key`` in every module, for :meth:`rows`."""
        for layer in self.layers.values():
            layer.keep(key)

    def forget(self, key: str) -> None:
        """Free the adapter kept under ``key`` in every module."""
        for layer in self.layers.values():
            layer.forget(key)

    @contextmanager
    def rows(self, keys: list[str]) -> Iterator[dict[str, object]]:
        """Forward passes in which row i of the batch uses the adapter kept under ``keys[i]``
        (each row its own experts, router and top-k); yields no extra forward arguments. Each
        layer refuses these rows in training mode."""
        device = model_device(self.model)
        self.context.row_groups = [
            (key, torch.tensor([i for i, k in enumerate(keys) if k == key], device=device))
            for key in dict.fromkeys(keys)
        ]
        try:
            yield {}
        finally:
            self.context.row_groups = None

    # ----------------------------------------------------------------- losses and embeddings
    def load_balancing_loss(self) -> Tensor:
        """Sum over modules of the last training forward's L_lb (0 if none was recorded)."""
        return self.context.load_balancing_loss()

    @contextmanager
    def collecting_embeddings(self) -> Iterator[dict[str, EmbeddingSums]]:
        """While active, every forward adds its token sums of W_tok x and A_e x per module."""
        self.context.embeddings = {}
        try:
            yield self.context.embeddings
        finally:
            self.context.embeddings = None


def _stacked_keys(module: str, expert_ids: list[int]) -> tuple[list[str], list[str]]:
    """State keys of the column blocks of ``down`` (A^T) and the row blocks of ``up`` (B^T), in
    the layer's stacking order: local experts, shared expert (and, in ``down``, the router)."""
    a_keys = [expert_key(module, e, "A") for e in expert_ids]
    a_keys += [shared_key(module, "A"), router_key(module)]
    b_keys = [expert_key(module, e, "B") for e in expert_ids] + [shared_key(module, "B")]
    return a_keys, b_keys


def _checked(state: StateDict, key: str, shape: tuple[int, int], like: Tensor) -> Tensor:
    tensor = state[key]
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"state tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}: "
            f"it was saved with another rank or base model"
        )
    return tensor.to(device=like.device, dtype=like.dtype)


def _capture_token_mask(context: RoutingContext):
    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        context.start_forward(kwargs.get("attention_mask"))

    return hook


def inject_hmole(
    model: nn.Module,
    target_modules: list[str] | str = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    top_k: int = 2,
) -> HMoLEAdapter:
    """Freeze ``model`` and replace each target linear with an :class:`HMoLELinear` in place."""
    targets = resolve_targets(
        model, list(target_modules) if not isinstance(target_modules, str) else target_modules
    )
    model.requires_grad_(False)
    context = RoutingContext()
    layers: dict[str, HMoLELinear] = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = HMoLELinear(base, name, context, rank, alpha, dropout, top_k)
        layer.to(device=base.weight.device).train(model.training)  # the model's mode, not nn's
        setattr(parent, child, layer)
        layers[name] = layer
    model.register_forward_pre_hook(_capture_token_mask(context), with_kwargs=True)
    return HMoLEAdapter(model, layers, context)
