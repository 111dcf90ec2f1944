"""FedDPA (Yang et al., NeurIPS 2024, "Dual-Personalizing Adapter for Federated Foundation
Models"), FedDPA-T variant, in a faithful but simple form on two named PEFT LoRA adapters.

- A **global** adapter is trained on every client and averaged by the server (FedAvg), exactly
  like FedIT's LoRA.
- A **local** adapter is trained on the client's data and never leaves it: it is private state,
  kept out of the upload and therefore out of aggregation.
- Each round a client first trains its local adapter with the received global adapter frozen
  and both active at weight 1/2 (the paper's fixed training mix), then trains the global adapter
  alone, starting again from the received one, for the same number of steps. Both phases use
  the run's shared batches and seeds, so FedDPA does twice the local steps of the other methods
  (as in the paper, where both adapters get the full local epochs).
- Inference (instance-wise dynamic weighting): for a test input x, the local adapter's weight is
  ``alpha(x) = 1/2 * mean_k cos(h(x), h(a_k))`` clipped to [0, 1/2], where h is the last-layer
  hidden state of the last prompt token with only the local adapter active and a_1..a_K are K = 5
  of the client's training prompts (a fixed, seeded choice per client; the paper samples them per
  input); the global adapter gets ``1 - alpha(x)``. The client's model is evaluated after
  aggregation: the averaged global adapter plus its own local adapter.

Simplifications, all deliberate: the local adapter is trained from round 0 (the paper's code waits
one round), anchors are fixed per client, and the per-instance weights make evaluation and
serving run one example at a time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedamole.data.example import Example
from fedamole.device import model_device
from fedamole.federation.method import AnswerGroup
from fedamole.methods.peft_method import PeftMethod, PeftRuntime, Phase, adapter_key

GLOBAL, LOCAL = "global", "local"
TRAIN_MIX = 0.5  # weight of each adapter while the local adapter trains
MAX_LOCAL_WEIGHT = 0.5  # alpha(x) = MAX_LOCAL_WEIGHT * mean cosine similarity, clipped
NUM_ANCHORS = 5


class FedDPA(PeftMethod):
    """Global adapter federated, local adapter private, mixed per instance at inference."""

    def __init__(self) -> None:
        super().__init__(
            "feddpa",
            shared=adapter_key(GLOBAL),
            phases=(
                Phase({GLOBAL: TRAIN_MIX, LOCAL: 1 - TRAIN_MIX}, adapter_key(LOCAL)),
                Phase({GLOBAL: 1.0}, adapter_key(GLOBAL)),
            ),
            evaluates_after_aggregation=True,
            shares_personal_model=False,
            adapters=(GLOBAL, LOCAL),
        )

    serves_from_client_data = True  # the anchors are the client's own training prompts

    def answer_groups(self, runtime: PeftRuntime, examples: list[Example]) -> list[AnswerGroup]:
        """One example at a time, each with its own local weight alpha(x)."""
        weights = local_weights(runtime, examples).tolist() if examples else []
        return [
            (runtime.handle.mixing({GLOBAL: 1 - a, LOCAL: a}), [i]) for i, a in enumerate(weights)
        ]

    def answer_doc(self, runtime: PeftRuntime) -> dict[str, object]:
        """The rule and its anchor prompts (the client's own: private)."""
        anchors = [runtime.data.prompter.prompt(ex) for ex in anchor_examples(runtime)]
        return {"rule": self.inference(), "max_local_weight": MAX_LOCAL_WEIGHT, "anchors": anchors}

    def inference(self) -> str:
        return (
            f"h = W0 x + (1 - a) * global + a * local, a = {MAX_LOCAL_WEIGHT} * mean cosine "
            f"similarity (clipped to [0, {MAX_LOCAL_WEIGHT}]) of the prompt's last-token "
            f"last-layer state (local adapter only) to {NUM_ANCHORS} of the client's "
            "training prompts"
        )


def local_weights(runtime: PeftRuntime, examples: list[Example]) -> Tensor:
    """alpha(x) per example from its similarity to the client's anchor training prompts."""
    anchors = anchor_examples(runtime)
    prompts = [runtime.data.prompter.prompt_ids(ex) for ex in [*anchors, *examples]]
    with runtime.handle.mixing({LOCAL: 1.0}):
        states = last_token_states(runtime, prompts)
    similarity = F.cosine_similarity(
        states[len(anchors) :, None], states[None, : len(anchors)], dim=-1
    )
    return (MAX_LOCAL_WEIGHT * similarity.mean(dim=1)).clamp(0.0, MAX_LOCAL_WEIGHT)


def anchor_examples(runtime: PeftRuntime) -> list[Example]:
    """K training examples of this client, the same every round (seeded by run and client)."""
    train = runtime.data.splits.train
    rng = np.random.default_rng([runtime.cfg.seed, runtime.data.client_id])
    picks = rng.choice(len(train), size=min(NUM_ANCHORS, len(train)), replace=False)
    return [train[i] for i in sorted(picks.tolist())]


@torch.no_grad()
def last_token_states(runtime: PeftRuntime, prompts: list[list[int]]) -> Tensor:
    """Last-layer hidden state of each prompt's last token (left-padded batches, eval mode)."""
    model, tokenizer = runtime.handle.model, runtime.tokenizer
    model.eval()
    previous, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        states = []
        size = runtime.cfg.eval.batch_size
        for start in range(0, len(prompts), size):
            batch = tokenizer.pad({"input_ids": prompts[start : start + size]}, return_tensors="pt")
            batch = batch.to(model_device(model))
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
            states.append(hidden[:, -1].float())
    finally:
        tokenizer.padding_side = previous
    return torch.cat(states)
