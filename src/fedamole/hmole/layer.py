"""The HMoLE layer (SPEC 2): a frozen base Linear plus a shared LoRA expert, the client's local
domain experts and a token-level router whose keys are the experts' own A projections.

All local experts are stacked, so the forward pass is a handful of batched matmuls whatever the
number of experts: no per-expert Python loop and no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def lora_uniform_(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """LoRA's A init (Kaiming-uniform, a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on the last dim;
    also nn.Linear's default weight init, so it serves the router too."""
    bound = 1.0 / math.sqrt(tensor.shape[-1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


@dataclass
class EmbeddingSums:
    """Running sums over non-padding tokens for the RSEA embeddings of one module."""

    data: Tensor  # (r,) sum of W_tok x
    experts: Tensor  # (E, r) sum of A_e x
    tokens: int = 0


@dataclass
class RoutingContext:
    """State shared by every HMoLE layer of one model for the current forward pass.

    The model's forward pre-hook stores the batch's token mask here so each layer can leave
    padding out of the load-balancing loss and the embeddings; layers leave their losses here.
    """

    token_mask: Tensor | None = None
    lb_losses: list[Tensor] = field(default_factory=list)
    embeddings: dict[str, EmbeddingSums] | None = None

    def mask_for(self, leading_shape: torch.Size) -> Tensor | None:
        """Flat bool mask matching a layer input's leading dims (the last columns during cached
        decoding), or None when every token counts."""
        mask = self.token_mask
        if mask is None or mask.dim() != 2 or len(leading_shape) != 2:
            return None
        if mask.shape[1] != leading_shape[1]:
            mask = mask[:, -leading_shape[1] :]
        return mask.reshape(-1).bool()


class HMoLELinear(nn.Module):
    """A frozen ``nn.Linear`` wrapped with HMoLE:
    h = W0 x + s B_s A_s drop(x) + sum_{e in top-k} p~_e(x) s B_e A_e drop(x)."""

    def __init__(
        self,
        base: nn.Linear,
        name: str,
        context: RoutingContext,
        rank: int,
        alpha: float,
        dropout: float,
        top_k: int,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"HMoLE rank must be a positive integer (hmole.rank), got {rank}")
        if top_k <= 0:
            raise ValueError(f"HMoLE top_k must be a positive integer (hmole.top_k), got {top_k}")
        self.base = base.requires_grad_(False)
        self.name = name
        self.context = context
        self.rank, self.top_k, self.scaling = rank, top_k, alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shared_A = nn.Parameter(lora_uniform_(torch.empty(rank, self.in_features)))
        self.shared_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.router = nn.Linear(self.in_features, rank, bias=False)
        self.expert_ids: list[int] = []
        self.expert_A = nn.Parameter(torch.empty(0, rank, self.in_features))
        self.expert_B = nn.Parameter(torch.empty(0, self.out_features, rank))

    # ----------------------------------------------------------------- architecture
    def set_experts(self, expert_ids: list[int]) -> None:
        """Give this module a new local expert set (freshly initialised; load weights after)."""
        ids = sorted(int(e) for e in expert_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: duplicate expert ids in {ids}")
        if len(ids) < self.top_k:
            raise ValueError(
                f"{self.name}: top-k routing needs at least hmole.top_k={self.top_k} local experts, "
                f"got {len(ids)}; lower hmole.top_k or raise rsea.min_experts"
            )
        device = self.shared_A.device
        self.expert_ids = ids
        self.expert_A = nn.Parameter(
            lora_uniform_(torch.empty(len(ids), self.rank, self.in_features, device=device))
        )
        self.expert_B = nn.Parameter(
            torch.zeros(len(ids), self.out_features, self.rank, device=device)
        )

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        result = self.base(x)
        n_experts = len(self.expert_ids)
        if n_experts == 0:
            raise RuntimeError(f"{self.name}: no local experts; call set_architecture first")
        r = self.rank
        flat = x.reshape(-1, self.in_features).to(self.shared_A.dtype)
        stacked_A = torch.cat([self.shared_A.unsqueeze(0), self.expert_A]).reshape(
            -1, self.in_features
        )
        projected = self.dropout(flat) @ stacked_A.T  # (T, (E+1) r): A_s drop(x), A_e drop(x)
        keys = self._keys(flat, projected)  # (T, E, r), no dropout
        query = self.router(flat)  # (T, r)
        probs, top_idx, top_w = self._route(keys, query)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_w)
        gates = torch.cat([gates.new_ones(gates.shape[0], 1), gates], dim=-1)  # shared weight 1
        mixed = (projected.view(-1, n_experts + 1, r) * gates.unsqueeze(-1)).reshape(
            flat.shape[0], -1
        )
        stacked_B = torch.cat([self.shared_B.unsqueeze(0), self.expert_B]).transpose(1, 2)
        update = (mixed @ stacked_B.reshape(-1, self.out_features)) * self.scaling
        self._record(x.shape[:-1], probs, top_idx, keys, query)
        return result + update.view(*x.shape[:-1], self.out_features).to(result.dtype)

    def _route(self, keys: Tensor, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Softmax over local experts of <A_e x, W_tok x>/sqrt(r); top-k, renormalised."""
        probs = (torch.einsum("ter,tr->te", keys, query) / math.sqrt(self.rank)).softmax(dim=-1)
        top_p, top_idx = probs.topk(self.top_k, dim=-1)
        return probs, top_idx, top_p / top_p.sum(-1, keepdim=True)

    @torch.no_grad()
    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """For inspection: the global ids of each token's top-k experts and their weights."""
        flat = x.reshape(-1, self.in_features).to(self.shared_A.dtype)
        keys = (flat @ self.expert_A.reshape(-1, self.in_features).T).view(
            -1, len(self.expert_ids), self.rank
        )
        _, top_idx, top_w = self._route(keys, self.router(flat))
        ids = torch.tensor(self.expert_ids, device=top_idx.device)
        return ids[top_idx], top_w

    def _keys(self, flat: Tensor, projected: Tensor) -> Tensor:
        """key_e = A_e x without dropout; reuses the projection when dropout is inactive."""
        n_experts = len(self.expert_ids)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return projected[:, self.rank :].view(-1, n_experts, self.rank)
        return (flat @ self.expert_A.reshape(-1, self.in_features).T).view(-1, n_experts, self.rank)

    def _record(
        self, leading: torch.Size, probs: Tensor, top_idx: Tensor, keys: Tensor, query: Tensor
    ) -> None:
        mask = self.context.mask_for(leading)
        if self.training and torch.is_grad_enabled():
            self.context.lb_losses.append(load_balancing_loss(probs, top_idx, mask))
        if self.context.embeddings is not None:
            self._accumulate_embeddings(keys, query, mask)

    @torch.no_grad()
    def _accumulate_embeddings(self, keys: Tensor, query: Tensor, mask: Tensor | None) -> None:
        if mask is not None:
            keys, query = keys[mask], query[mask]
        sums = self.context.embeddings.get(self.name)
        if sums is None:
            sums = EmbeddingSums(
                query.new_zeros(self.rank, dtype=torch.float64),
                keys.new_zeros(keys.shape[1:], dtype=torch.float64),
            )
            self.context.embeddings[self.name] = sums
        sums.data += query.double().sum(0)
        sums.experts += keys.double().sum(0)
        sums.tokens += query.shape[0]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, top_k={self.top_k}, "
            f"scaling={self.scaling:g}, experts={self.expert_ids}"
        )


def load_balancing_loss(probs: Tensor, top_idx: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-style L_lb = E * sum_e P_e f_e over non-padding tokens (SPEC 2).

    P_e: mean router probability of expert e; f_e: share of the top-k slots that went to e.
    """
    n_experts = probs.shape[-1]
    slots = torch.zeros_like(probs).scatter(-1, top_idx, 1.0)
    if mask is not None:
        probs, slots = probs[mask], slots[mask]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    mean_prob = probs.mean(0)
    slot_share = slots.sum(0) / slots.sum()
    return n_experts * (mean_prob * slot_share).sum()
