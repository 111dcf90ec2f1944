"""LoRA baselines on real PEFT adapters, each a few rules on one :class:`PeftMethod`.

Every baseline injects ``peft`` LoRA with FedAMoLE's rank, alpha, dropout and target modules
(``cfg.hmole``), trains with the shared loop (same steps, batches, seeds and Adam settings) and
differs only in

- ``shared``: which adapter tensors go to the server and are averaged (per key, over the clients
  that sent it: :func:`fedamole.aggregation.aggregate`); everything else stays on the client;
- ``phases``: what local training updates, with which adapters active at which weight;
- ``evaluates_after_aggregation``: whether a client's model is the aggregated (global) one plus
  its private part, evaluated after aggregation, or the one it just trained locally.

=========  ==============  ================  =====================
method     shared          trained           evaluated
=========  ==============  ================  =====================
local      nothing         A and B           after local training
fedit      A and B         A and B           after aggregation
fedit-ft   A and B         A and B           after local training
ffa-lora   B               B (A stays init)  after aggregation
=========  ==============  ================  =====================

FFA-LoRA's A matrices are drawn once from the run seed, identically on every client (what the
server's one-time initialisation amounts to; that one-off download is not counted), and never
change. FedDPA (:mod:`fedamole.methods.feddpa`) adds a second, private adapter.

:class:`PeftMethod` and its handles are in :mod:`fedamole.methods.peft_method`.
"""

from __future__ import annotations

from fedamole.methods.peft_method import PeftMethod, every_key, no_key, train_single


def lora_b_key(key: str) -> bool:
    return ".lora_B." in key


def local() -> PeftMethod:
    """Each client fine-tunes its own LoRA on its own data; nothing is ever sent."""
    return PeftMethod(
        "local",
        shared=no_key,
        phases=train_single(every_key),
        evaluates_after_aggregation=False,
        shares_personal_model=False,
    )


def fedit() -> PeftMethod:
    """FedIT: FedAvg of one LoRA; each client is served the aggregated (global) model."""
    return PeftMethod("fedit", every_key, train_single(every_key), evaluates_after_aggregation=True)


def fedit_ft() -> PeftMethod:
    """FedIT-FT: FedIT, each client evaluated with the LoRA it just fine-tuned locally."""
    return PeftMethod(
        "fedit-ft", every_key, train_single(every_key), evaluates_after_aggregation=False
    )


def ffa_lora() -> PeftMethod:
    """FFA-LoRA: A frozen at its seeded init, only B trained and averaged; global model served.
    The frozen A is the same seeded tensor on every client, so the personalised model holds
    nothing the server lacks."""
    return PeftMethod(
        "ffa-lora", lora_b_key, train_single(lora_b_key), evaluates_after_aggregation=True
    )
