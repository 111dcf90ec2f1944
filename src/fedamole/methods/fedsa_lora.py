"""FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): share A, keep B.

The paper's finding is that LoRA's ``A`` matrices learn what clients have in common and the
``B`` matrices what is particular to each client's data. So a client uploads only its ``A``
tensors, the server averages them (FedAvg, as FedIT does), and every client keeps its own ``B``:
never sent, never averaged. Everything else is FedIT's: one LoRA with FedAMoLE's rank, alpha,
dropout and target modules, the same local training of both matrices.

A client's model is the aggregated ``A`` with its own ``B``; it is evaluated after aggregation,
as it starts the next round (choice: the paper evaluates each client's model after the final
aggregation; the per-round table follows the same rule). Its ``B`` never leaves the client, so on
Flower the personalised model stays on the organisation's node.
"""

from __future__ import annotations

from fedamole.methods.peft_method import PeftMethod, every_key, train_single


def lora_a_key(key: str) -> bool:
    return ".lora_A." in key


def fedsa_lora() -> PeftMethod:
    """A and B trained locally; only A uploaded and averaged; each client's own B kept."""
    return PeftMethod(
        "fedsa-lora",
        shared=lora_a_key,
        phases=train_single(every_key),
        evaluates_after_aggregation=True,
        shares_personal_model=False,
    )
