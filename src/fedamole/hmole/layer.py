"""The HMoLE layer (SPEC 2): a frozen base Linear plus a shared LoRA expert, the client's local
domain experts and a token-level router whose keys are the experts' own A projections.

A training step is bound by the number of small operations, not by arithmetic, so each module
holds its whole adapter in two stacked, transposed parameters and runs it in a fixed handful of
ops whatever the number of experts:

- ``down`` (d_in x (E+2) r) = [A_1 .. A_E, A_s, W_tok]^T: one matmul gives every expert's
  projection, every routing key and the query.
- ``up`` ((E+1) r x d_out) = [B_1 .. B_E, B_s]^T: one fused ``addmm`` adds the gated mixture to
  the base output.

Gates are dense over the E+1 stacked experts (zero outside each token's top-k, 1 for the shared
expert), made by one scatter into a constant row: no per-expert loop, no host synchronisation.
The load-balancing loss is computed once per model from the routing the layers record.
The adapter path is one pure function of tensors, :func:`mixture`.
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


@dataclass(frozen=True)
class MixtureOutput:
    out: Tensor  # (T, d_out) base output plus the adapter's
    projected: Tensor  # (T, (E+2) r) A_e x, A_s x, W_tok x without dropout
    scaled_logits: Tensor  # (T, E) router logits / sqrt(r), float32 or wider
    top_idx: Tensor  # (T, k) local indices of each token's top-k experts


def mixture(
    x: Tensor,
    result: Tensor,
    down: Tensor,
    up: Tensor,
    gate_template: Tensor,
    *,
    rank: int,
    top_k: int,
    scaling: float,
    dropout: float,
) -> MixtureOutput:
    """The adapter on flat tokens x (T, d_in) added to the base output ``result`` (T, d_out).

    ``dropout`` is the probability to apply now (0 in eval mode).
    """
    n = gate_template.shape[1] - 1
    projected = x @ down
    scaled_logits = router_logits(projected, n, rank)
    gates, top_idx = top_k_gates(scaled_logits, gate_template, top_k)
    if dropout > 0:
        dropped = nn.functional.dropout(x, dropout, training=True) @ down[:, : (n + 1) * rank]
    else:
        dropped = projected[:, : (n + 1) * rank]
    mixed = (dropped.view(-1, n + 1, rank) * gates.to(dropped.dtype).unsqueeze(-1)).view(
        dropped.shape[0], -1
    )
    out = torch.addmm(result.to(mixed.dtype), mixed, up, alpha=scaling).to(result.dtype)
    return MixtureOutput(out, projected, scaled_logits, top_idx)


def router_logits(projected: Tensor, num_experts: int, rank: int) -> Tensor:
    """<A_e x, W_tok x> / sqrt(r) for every local expert e: (T, E), float32 or wider."""
    per_expert = projected.view(-1, num_experts + 2, rank)
    keys, _, query = per_expert.split([num_experts, 1, 1], dim=1)
    # At least float32, even when autocast runs the projections in 16 bits.
    precision = projected.dtype if projected.dtype.itemsize >= 4 else torch.float32
    return (keys * query).sum(-1, dtype=precision) * (1.0 / math.sqrt(rank))


def top_k_gates(scaled_logits: Tensor, gate_template: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Dense (T, E+1) gates: the renormalised top-k softmax weights (= the softmax over the
    top-k logits), zero elsewhere, and the template's 1 for the shared expert in the last column."""
    top_logits, top_idx = scaled_logits.topk(top_k, dim=-1)
    template = gate_template.expand(scaled_logits.shape[0], -1)
    return template.scatter(1, top_idx, top_logits.softmax(-1).to(template.dtype)), top_idx


@dataclass
class EmbeddingSums:
    """Running sums over non-padding tokens for the RSEA embeddings of one module."""

    data: Tensor  # (r,) sum of W_tok x
    experts: Tensor  # (E, r) sum of A_e x
    tokens: int = 0


@dataclass
class RoutingRecord:
    """One module's routing in a training forward, kept for the load-balancing loss."""

    probs: Tensor  # (T, E) softmax over the local experts
    top_idx: Tensor  # (T, k) local indices of each token's top-k experts
    mask: Tensor | None  # (T,) float, 1 for tokens that count; None when all count


@dataclass(frozen=True)
class ExpertSet:
    """One client's adapter in one module, kept for per-row serving: its stacked ``down``/``up``
    and its gate template (so its own number of experts)."""

    down: Tensor
    up: Tensor
    gate_template: Tensor


# Rows of a batch that use one client's experts: (the key it was kept under, row indices).
RowGroup = tuple[str, Tensor]


@dataclass
class RoutingContext:
    """State shared by every HMoLE layer of one model for the current forward pass.

    The model's forward pre-hook stores the batch's token mask here so each layer can leave
    padding out of the load-balancing loss and the embeddings; layers leave their routing here.
    """

    token_mask: Tensor | None = None
    records: list[RoutingRecord] = field(default_factory=list)
    embeddings: dict[str, EmbeddingSums] | None = None
    # Serving several clients in one batch: each row's experts come from its group's kept set.
    row_groups: list[RowGroup] | None = None
    _flat_masks: dict[torch.Size, Tensor | None] = field(default_factory=dict)

    def start_forward(self, token_mask: Tensor | None) -> None:
        """Called by the model's forward pre-hook: a new batch, no routing recorded yet."""
        self.token_mask = token_mask
        self.records.clear()
        self._flat_masks.clear()

    def mask_for(self, leading_shape: torch.Size) -> Tensor | None:
        """Flat float mask (1 = token counts) matching a layer input's leading dims (the last
        columns during cached decoding), or None when every token counts. Computed once per
        forward and shape, as every layer of the pass asks for the same one."""
        if leading_shape not in self._flat_masks:
            self._flat_masks[leading_shape] = self._flat_mask(leading_shape)
        return self._flat_masks[leading_shape]

    def _flat_mask(self, leading_shape: torch.Size) -> Tensor | None:
        mask = self.token_mask
        if mask is None or mask.dim() != 2 or len(leading_shape) != 2:
            return None
        if mask.shape[1] != leading_shape[1]:
            mask = mask[:, -leading_shape[1] :]
        return mask.reshape(-1).float()

    def load_balancing_loss(self) -> Tensor:
        """Sum over the recorded modules of L_lb, batched over modules with the same shapes."""
        groups: dict[tuple[int, ...], list[RoutingRecord]] = {}
        for record in self.records:  # masks are cached per input shape: same object, same tokens
            key = (*record.probs.shape, id(record.mask))
            groups.setdefault(key, []).append(record)
        losses = [
            load_balancing_loss(
                torch.stack([r.probs for r in group]),
                torch.stack([r.top_idx for r in group]),
                group[0].mask,
            )
            for group in groups.values()
        ]
        return sum(losses[1:], losses[0]) if losses else torch.zeros(())


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
        self.dropout = dropout  # on the experts' input, not on the router's keys and query
        self.expert_ids: list[int] = []
        self.kept: dict[str, ExpertSet] = {}  # per-row serving: client key -> its adapter
        shared_A = lora_uniform_(torch.empty(rank, self.in_features))
        router = lora_uniform_(torch.empty(rank, self.in_features))
        self.down = nn.Parameter(torch.cat([shared_A, router]).t().contiguous())
        self.up = nn.Parameter(torch.zeros(rank, self.out_features))
        self.register_buffer("gate_template", torch.ones(1, 1), persistent=False)

    # ----------------------------------------------------------------- views of the stacks
    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    @property
    def expert_A(self) -> Tensor:
        """(E, r, d_in) view of the local experts' A."""
        n, r = self.num_experts, self.rank
        return self.down[:, : n * r].t().view(n, r, self.in_features)

    @property
    def shared_A(self) -> Tensor:
        n, r = self.num_experts, self.rank
        return self.down[:, n * r : (n + 1) * r].t()

    @property
    def router_weight(self) -> Tensor:
        """W_tok (r, d_in)."""
        return self.down[:, (self.num_experts + 1) * self.rank :].t()

    @property
    def expert_B(self) -> Tensor:
        """(E, d_out, r) view of the local experts' B."""
        n, r = self.num_experts, self.rank
        return self.up[: n * r].view(n, r, self.out_features).transpose(1, 2)

    @property
    def shared_B(self) -> Tensor:
        return self.up[self.num_experts * self.rank :].t()

    # ----------------------------------------------------------------- architecture
    def set_experts(self, expert_ids: list[int]) -> None:
        """Give this module a new local expert set (freshly initialised; load weights after).
        The shared expert and the router keep their values."""
        ids = sorted(int(e) for e in expert_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: duplicate expert ids in {ids}")
        if len(ids) < self.top_k:
            raise ValueError(
                f"{self.name}: top-k routing needs at least hmole.top_k={self.top_k} local experts, "
                f"got {len(ids)}; lower hmole.top_k or raise rsea.min_experts"
            )
        old = self.num_experts * self.rank
        down, up = self.down.detach(), self.up.detach()
        # Initialised on the CPU, so a given seed gives the same experts on every device.
        fresh_A = lora_uniform_(torch.empty(len(ids) * self.rank, self.in_features)).to(down)
        self.expert_ids = ids
        self.down = nn.Parameter(torch.cat([fresh_A.t(), down[:, old:]], dim=1))
        self.up = nn.Parameter(
            torch.cat([up.new_zeros(len(ids) * self.rank, up.shape[1]), up[old:]])
        )
        template = down.new_zeros(1, len(ids) + 1)
        template[0, -1] = 1.0  # the shared expert always has weight 1
        self.gate_template = template

    def keep(self, key: str) -> None:
        """Keep a copy of the current adapter under ``key``, for batches whose rows use it."""
        self.kept[key] = ExpertSet(
            self.down.detach().clone(), self.up.detach().clone(), self.gate_template.clone()
        )

    def forget(self, key: str) -> None:
        """Free the copy kept under ``key`` (its memory goes back to the device)."""
        del self.kept[key]

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        if self.context.row_groups is not None:
            if self.training:  # as PEFT refuses per-row adapters in training
                raise RuntimeError(
                    f"{self.name}: per-row adapters (rows of different clients in one batch) "
                    "are for inference only; call model.eval() first"
                )
            return self._forward_rows(x, self.context.row_groups)
        if not self.expert_ids:
            raise RuntimeError(f"{self.name}: no local experts; call set_architecture first")
        leading = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        dropout = self.dropout if self.training else 0.0
        current = ExpertSet(self.down, self.up, self.gate_template)
        mixed = self._mix(flat, self.base(flat), current, dropout)
        self._record(leading, mixed)
        return mixed.out.view(*leading, self.out_features)

    @torch.no_grad()
    def _forward_rows(self, x: Tensor, groups: list[RowGroup]) -> Tensor:
        """Inference on a batch x (B, ..., d_in) whose rows belong to different clients: the
        base output once for every row, then each group's own experts, router and top-k on its
        rows, through the same :func:`mixture` as a single client's forward."""
        result = self.base(x)  # (B, ..., d_out)
        out = torch.empty_like(result)
        for key, rows in groups:
            mixed = self._mix(
                x.index_select(0, rows).reshape(-1, self.in_features),
                result.index_select(0, rows).reshape(-1, self.out_features),
                self.kept[key],
                dropout=0.0,
            )
            out.index_copy_(0, rows, mixed.out.view(len(rows), *result.shape[1:]))
        return out

    def _mix(
        self, flat: Tensor, result: Tensor, adapter: ExpertSet, dropout: float
    ) -> MixtureOutput:
        """:func:`mixture` of flat tokens (T, d_in) with one client's adapter."""
        return mixture(
            self._adapter_input(flat),
            result,
            adapter.down,
            adapter.up,
            adapter.gate_template,
            rank=self.rank,
            top_k=self.top_k,
            scaling=self.scaling,
            dropout=dropout,
        )

    def _adapter_input(self, flat: Tensor) -> Tensor:
        """Under autocast the matmuls cast for themselves (tensor cores on GPU); otherwise the
        adapter runs in its master dtype and the result is cast back at the boundary."""
        if torch.is_autocast_enabled(flat.device.type):
            return flat
        return flat.to(self.down.dtype)

    @torch.no_grad()
    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """For inspection: the global ids of each token's top-k experts and their weights."""
        flat = self._adapter_input(x.reshape(-1, self.in_features))
        logits = router_logits(flat @ self.down, self.num_experts, self.rank)
        gates, top_idx = top_k_gates(logits, self.gate_template, self.top_k)
        ids = torch.tensor(self.expert_ids, device=top_idx.device)
        return ids[top_idx], gates.gather(1, top_idx)

    def _record(self, leading: torch.Size, mixed: MixtureOutput) -> None:
        if self.training and torch.is_grad_enabled():
            probs = mixed.scaled_logits.softmax(-1)
            mask = self.context.mask_for(leading)
            self.context.records.append(RoutingRecord(probs, mixed.top_idx, mask))
        if self.context.embeddings is not None:
            self._accumulate_embeddings(mixed.projected, self.context.mask_for(leading))

    @torch.no_grad()
    def _accumulate_embeddings(self, projected: Tensor, mask: Tensor | None) -> None:
        per_expert = projected.view(-1, self.num_experts + 2, self.rank).double()
        weights = per_expert.new_ones(per_expert.shape[0]) if mask is None else mask.double()
        totals = torch.einsum("t,ter->er", weights, per_expert)  # experts, shared, router
        data, experts = totals[-1], totals[: self.num_experts]
        sums = self.context.embeddings.setdefault(
            self.name, EmbeddingSums(torch.zeros_like(data), torch.zeros_like(experts))
        )
        sums.data += data
        sums.experts += experts
        sums.tokens += int(weights.sum().item())

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, top_k={self.top_k}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}, experts={self.expert_ids}"
        )


def load_balancing_loss(probs: Tensor, top_idx: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-style L_lb = E * sum_e P_e f_e over non-padding tokens (SPEC 2).

    P_e: mean router probability of expert e; f_e: share of the top-k slots that went to e.
    ``probs`` (..., T, E) and ``top_idx`` (..., T, k) may stack several modules (summed);
    ``mask`` (T,) marks the tokens that count (bool or 0/1).
    """
    n_experts, k = probs.shape[-1], top_idx.shape[-1]
    slots = torch.zeros_like(probs).scatter_(-1, top_idx, 1.0)
    # mean_prob = prob_sums / n and slot_share = slot_counts / (k n); 0 when no token counts.
    if mask is None:
        scale = n_experts / (k * max(probs.shape[-2], 1) ** 2)
        return (probs.sum(-2) * slots.sum(-2)).sum() * scale
    weights = mask.to(probs.dtype)
    tokens = weights.sum().clamp_min(1.0)
    return ((weights @ probs) * (weights @ slots)).sum() * n_experts / (k * tokens.square())
