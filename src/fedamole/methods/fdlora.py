"""FDLoRA (Qi et al. 2024, arXiv 2406.07925, "FDLoRA: Personalized Federated Learning of Large
Language Model via Dual LoRA Tuning") on two named PEFT LoRA adapters, as the FedAMoLE authors ran
it for their comparison (their public code is the reference where the paper is not explicit).

- **Global LoRA**, the only tensors uploaded. Each round a client trains it, starting from the
  server's, for ``federation.local_steps`` steps of the shared loop. The server averages the
  uploads (FedAvg) in round 0, the reference's round of local learning before federation; from
  round 1 on it takes the DiLoCo-style outer step of the paper: with the outer gradient
  ``g = theta - mean_i theta_i``, Nesterov-momentum SGD, ``m <- mu m + g``,
  ``theta <- theta - eta (g + mu m)`` (``baselines.fdlora_outer_lr`` eta = 1,
  ``baselines.fdlora_outer_momentum`` mu = 0.5, the reference's values; mu = 0 with eta = 1 is
  FedAvg). The momentum is server state (store keys ``momentum/global/...``, never sent).
- **Personal LoRA**, private, never uploaded. In the first round of every k-round period that
  the client takes part in (rounds 0, k, 2k, ... when all take part; k =
  ``baselines.fdlora_sync_every``, 5 as in the reference) it becomes a copy of the global LoRA
  the client has just trained on its own data (the paper's synchronisation); it is not trained
  otherwise. The round of the last copy is kept privately under ``sync/round``.
- **Budget per round**: ``local_steps`` optimiser steps on one LoRA, FedIT's exactly (the
  reference's inner optimiser is AdamW with torch's default decay; the shared loop's Adam
  settings are kept, as for every method). The synchronisation is a copy. AdaFusion adds
  ``FUSION_EVALUATIONS`` forward passes over at most ``FUSION_EXAMPLES`` examples.
- **AdaFusion**, after every aggregation: the client's model is
  ``h = W0 x + (w_g B_g A_g + w_p B_p A_p) x * alpha / r`` with weights (w_g, w_p) in
  ``[-FUSION_BOUND, FUSION_BOUND]`` chosen without gradients to minimise the mean token loss on
  its first ``FUSION_EXAMPLES`` auxiliary examples (its own data, held out from training as in
  the reference: on training examples the adapter that memorised them would win) plus LoraHub's
  L1 penalty ``L1_PENALTY * mean |w|``. The search is scipy's bounded Nelder-Mead from the simplex
  {global alone, personal alone, both at one half}, stopped after ``FUSION_EVALUATIONS`` loss
  evaluations (fewer when it converges); the best point evaluated wins. The weights are kept
  under ``fusion/weights`` and saved with the personal model.

Deliberate deviations: the reference (LoraHub style, nevergrad's NGOpt with 5 evaluations from
(0, 0)) fuses parameters, ``w_g A_g + w_p A_p`` and ``w_g B_g + w_p B_p``, whose product adds
cross terms ``B_g A_p`` and ``B_p A_g`` that neither LoRA learnt and makes each weight act
quadratically; here the adapters' outputs are mixed, so each weight scales exactly one LoRA's
update. nevergrad is not a dependency; scipy is.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize

from fedamole.config import BaselinesConfig, Config
from fedamole.data.tokenize import collate
from fedamole.device import autocast, model_device
from fedamole.federation.training import StepCallback, to_device
from fedamole.methods.peft_method import AdapterHandle, PeftMethod, PeftRuntime, Phase, adapter_key
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    ServerState,
    StateDict,
)

GLOBAL, PERSONAL = "global", "personal"
MOMENTUM = "momentum/"  # server-side outer momentum, keyed "momentum/<global key>"
FUSION_KEY = "fusion/weights"  # float32 tensor [w_global, w_personal]
SYNC_KEY = "sync/round"  # int64 tensor [round of the personal LoRA's last synchronisation]
FUSION_BOUND = 1.5  # the reference's search box
FUSION_EXAMPLES = 5  # the reference scores 5 auxiliary batches of one example
FUSION_EVALUATIONS = 12  # the simplex's 3 corners and 9 Nelder-Mead moves
L1_PENALTY = 0.05  # LoraHub's and the reference's weight on mean |w|
START_SIMPLEX = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))


class FDLoRA(PeftMethod):
    """Global LoRA federated (outer Nesterov step), personal LoRA synchronised from local
    training, the two fused per client by a gradient-free search (see module doc)."""

    def __init__(self) -> None:
        super().__init__(
            "fdlora",
            shared=adapter_key(GLOBAL),
            phases=(Phase({GLOBAL: 1.0}, adapter_key(GLOBAL)),),
            evaluates_after_aggregation=True,
            shares_personal_model=False,
            adapters=(GLOBAL, PERSONAL),
        )

    # ----------------------------------------------------------------- server side
    def init_state(
        self, cfg: Config, handle: AdapterHandle, participants: list[int]
    ) -> ServerState:
        state = super().init_state(cfg, handle, participants)
        state.store |= {MOMENTUM + k: torch.zeros_like(v) for k, v in state.store.items()}
        return state

    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        """The global LoRA only: the outer momentum never leaves the server."""
        weights = {k: v for k, v in state.store.items() if self.shared(k)}
        return ClientPayload(round=state.round, architecture={}, weights=weights, lr=state.lr)

    def complete_round(
        self,
        cfg: Config,
        state: ServerState,
        updates: list[ClientUpdate],
        next_participants: list[int],
    ) -> tuple[ServerState, Metrics]:
        """FedAvg in round 0, the outer Nesterov step on the average after that."""
        next_state, metrics = super().complete_round(cfg, state, updates, next_participants)
        if state.round > 0:
            next_state.store = outer_step(state.store, next_state.store, cfg.baselines)
        return next_state, metrics

    def describe(self, cfg: Config, payload: ClientPayload) -> dict[str, object]:
        return {**super().describe(cfg, payload), "fusion_weights": f"{FUSION_KEY} = [w_g, w_p]"}

    def inference(self) -> str:
        return (
            f"h = W0 x + (w_g * global + w_p * personal) (each LoRA at alpha / r), "
            f"(w_g, w_p) = the tensor {FUSION_KEY}, chosen by AdaFusion"
        )

    # ----------------------------------------------------------------- client side
    def client_round(
        self, payload: ClientPayload, runtime: PeftRuntime, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Train the global LoRA; once a period the personal LoRA becomes a copy of it."""
        synced = runtime.private.get(SYNC_KEY)
        update = super().client_round(payload, runtime, on_step)
        period = runtime.cfg.baselines.fdlora_sync_every
        if synced is None or int(synced) // period < payload.round // period:
            synced = torch.tensor([payload.round])
            runtime.private |= personal_copy(update.weights)
        runtime.private[SYNC_KEY] = synced
        return update

    def evaluate(self, payload: ClientPayload, runtime: PeftRuntime) -> ClientEvaluation:
        """AdaFusion on the aggregated global LoRA and the client's personal one, then the
        fused model on the client's splits."""
        runtime.handle.load({**runtime.private, **payload.weights})
        runtime.private[FUSION_KEY] = adaptive_fusion(runtime)
        return super().evaluate(payload, runtime)

    def serving_weights(self, runtime: PeftRuntime) -> dict[str, float]:
        w_global, w_personal = runtime.private[FUSION_KEY].tolist()
        return {GLOBAL: w_global, PERSONAL: w_personal}

    def personal_model(self, runtime: PeftRuntime) -> StateDict:
        """Both LoRAs as served, and the fusion weights that mix them."""
        return {**runtime.handle.state(), FUSION_KEY: runtime.private[FUSION_KEY]}


def personal_copy(global_state: StateDict) -> StateDict:
    """The global LoRA's tensors under the personal adapter's keys."""
    prefix = f"{GLOBAL}/"
    return {
        f"{PERSONAL}/{key.removeprefix(prefix)}": value.clone()
        for key, value in global_state.items()
    }


def outer_step(store: StateDict, mean: StateDict, settings: BaselinesConfig) -> StateDict:
    """torch's Nesterov SGD (dampening 0) on the outer gradient ``store - mean`` of every global
    tensor; the momentum buffers are updated in the returned store."""
    lr, mu = settings.fdlora_outer_lr, settings.fdlora_outer_momentum
    out = dict(mean)
    for key in (k for k in store if not k.startswith(MOMENTUM)):
        grad = store[key].float() - mean[key].float()
        momentum = mu * store[MOMENTUM + key].float() + grad
        out[MOMENTUM + key] = momentum.to(store[key].dtype)
        out[key] = (store[key].float() - lr * (grad + mu * momentum)).to(store[key].dtype)
    return out


@torch.no_grad()
def fusion_loss(runtime: PeftRuntime, batch: dict[str, torch.Tensor], weights: np.ndarray) -> float:
    """Mean token loss of the batch with the two LoRAs at these weights (eval mode)."""
    model = runtime.handle.model
    model.eval()
    device = model_device(model)
    mix = {GLOBAL: float(weights[0]), PERSONAL: float(weights[1])}
    with runtime.handle.mixing(mix), autocast(device, runtime.cfg.optim.mixed_precision):
        return model(**to_device(batch, device)).loss.float().item()


def adaptive_fusion(runtime: PeftRuntime) -> torch.Tensor:
    """(w_global, w_personal) minimising fusion loss + L1 penalty over at most
    ``FUSION_EVALUATIONS`` evaluations, as a float32 tensor."""
    batch = collate(runtime.data.aux[:FUSION_EXAMPLES], runtime.tokenizer.pad_token_id)
    seen: dict[tuple[float, float], float] = {}

    def objective(weights: np.ndarray) -> float:
        point = (float(weights[0]), float(weights[1]))
        if point not in seen:
            if len(seen) == FUSION_EVALUATIONS:
                return float("inf")  # budget spent: Nelder-Mead stops at its next check
            loss = fusion_loss(runtime, batch, weights)
            seen[point] = loss + L1_PENALTY * float(np.abs(weights).mean())
        return seen[point]

    minimize(
        objective,
        x0=np.array(START_SIMPLEX[0]),
        method="Nelder-Mead",
        bounds=[(-FUSION_BOUND, FUSION_BOUND)] * 2,
        options={"initial_simplex": np.array(START_SIMPLEX), "maxfev": FUSION_EVALUATIONS},
    )
    best = min(seen, key=seen.__getitem__)
    return torch.tensor(best, dtype=torch.float32)
