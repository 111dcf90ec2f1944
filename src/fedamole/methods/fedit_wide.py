"""FedIT at FedAMoLE's capacity: ``fedit-wide`` separates "more adapters chosen from the data"
from "more parameters".

A FedAMoLE client trains several rank-r LoRA experts per module, a shared expert and a router,
several times FedIT's single rank-r LoRA. If FedAMoLE beats FedIT, the gain could be capacity
alone. ``fedit-wide`` is FedIT (FedAvg of one LoRA, the global model served) whose rank is
chosen so that a client trains as many parameters as a FedAMoLE client does on average in the
same configuration:

- per target module (``d_in -> d_out``), a FedAMoLE client holds on average ``N_e * k_c / N_c``
  experts (RSEA gives every one of the ``N_e`` experts exactly ``k_c`` of the round's ``N_c``
  clients, SPEC 4), plus the shared expert, each ``r * (d_in + d_out)`` parameters, plus the
  router's ``r * d_in``;
- a rank-``r'`` LoRA on the same modules trains ``r' * (d_in + d_out)``, so
  ``r' = round(FedAMoLE's mean / sum(d_in + d_out))``, at least 1.

The rank is derived when the adapters are attached, from the config and the backbone's module
shapes, so a saved client is rebuilt at the same rank; the run's summary records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from peft import LoraConfig
from transformers import PreTrainedModel

from fedamole.config import Config
from fedamole.hmole.adapter import linear_shapes
from fedamole.methods.peft_method import PeftMethod, every_key, lora_config, train_single


def fedamole_mean_trainable(cfg: Config, shapes: list[tuple[int, int]]) -> float:
    """Parameters a FedAMoLE client trains on average with these settings, over target
    modules of ``(d_in, d_out)`` shapes."""
    h = cfg.hmole
    experts = h.num_experts * cfg.rsea.clients_per_expert / cfg.federation.participants_per_round
    return sum((experts + 1) * h.rank * (d_in + d_out) + h.rank * d_in for d_in, d_out in shapes)


def capacity_matched_rank(cfg: Config, shapes: list[tuple[int, int]]) -> int:
    """The LoRA rank whose trainable parameters come closest to FedAMoLE's mean."""
    per_rank = sum(d_in + d_out for d_in, d_out in shapes)
    return max(1, round(fedamole_mean_trainable(cfg, shapes) / per_rank))


@dataclass
class FedITWide(PeftMethod):
    """FedIT with one LoRA of the capacity-matched rank (module doc)."""

    derived: dict[str, object] = field(default_factory=dict, init=False, repr=False)

    def lora_settings(self, cfg: Config, model: PreTrainedModel) -> LoraConfig:
        shapes = linear_shapes(model, cfg.hmole.target_modules)
        rank = capacity_matched_rank(cfg, shapes)
        self.derived = {
            "lora_rank": rank,
            "trainable_per_client": rank * sum(d_in + d_out for d_in, d_out in shapes),
            "fedamole_mean_trainable_per_client": round(fedamole_mean_trainable(cfg, shapes)),
        }
        return replace(lora_config(cfg.hmole), r=rank)

    def adapter_settings(self, cfg: Config) -> dict[str, object]:
        settings = super().adapter_settings(cfg)
        return {"lora": {**settings["lora"], "rank": self.derived["lora_rank"]}}

    def notes(self) -> dict[str, object]:
        return self.derived


def fedit_wide() -> FedITWide:
    """FedIT at the capacity-matched rank; each client is served the aggregated model."""
    return FedITWide(
        "fedit-wide", every_key, train_single(every_key), evaluates_after_aggregation=True
    )
