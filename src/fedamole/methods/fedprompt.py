"""FedPrompt (Zhao et al., ICASSP 2023, "FedPrompt: Communication-efficient and
privacy-preserving prompt tuning in federated learning") on PEFT prompt tuning, and the rules it
shares with FedPTuning (:mod:`fedamole.methods.fedptuning`).

- The frozen backbone gets a soft prompt: ``baselines.num_virtual_tokens`` trainable input
  embeddings that PEFT prepends to every sequence (their positions carry label -100, so the loss
  stays on the response tokens).
- Each round a client trains the soft prompt for ``federation.local_steps`` steps with the shared
  loop (same batches, seeds, Adam settings and learning-rate schedule as every method) and
  uploads all of it; the server averages the clients' prompts (FedAvg).
- Every client is served the aggregated prompt: it is evaluated after aggregation, like FedIT.

Init (``baselines.prompt_tuning_init``): embeddings of random vocabulary tokens (PEFT's
``SAMPLE_VOCAB``), PEFT's N(0, 1) ``RANDOM``, or the embeddings of
``baselines.prompt_tuning_init_text``'s tokens, repeated or cut to length. The text is tokenised
with the run's tokenizer (PEFT's ``TEXT`` init would load a tokenizer by hub name, which the
built-in test model does not have).

Known limit, as in the FedAMoLE authors' code: PEFT's prompt-learning ``generate`` drops position
ids, so in a left-padded generation batch an example's real tokens sit as many positions further
from the soft prompt as it has padding (rotary embeddings see that shift); choice scoring is
right-padded and exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from peft import PromptLearningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedamole.config import Config
from fedamole.device import model_device
from fedamole.methods.peft_method import DEFAULT, AdapterHandle, PeftMethod, every_key, train_single

PromptConfigFactory = Callable[[Config, PreTrainedModel], PromptLearningConfig]

PEFT_INIT = {
    "vocab": PromptTuningInit.SAMPLE_VOCAB,
    "random": PromptTuningInit.RANDOM,
    "text": PromptTuningInit.RANDOM,  # overwritten with the text's embeddings, see module doc
}


def is_prompt_parameter(name: str) -> bool:
    """The soft prompt or prompt encoder: PEFT keeps it under ``prompt_encoder.<adapter>.``."""
    return name.startswith("prompt_encoder.")


class PromptMethod(PeftMethod):
    """A prompt-learning baseline: one PEFT prompt adapter, all of it averaged by FedAvg each
    round, the aggregated prompt served to every client."""

    def __init__(self, name: str, peft_config: PromptConfigFactory, settings: set[str]) -> None:
        super().__init__(
            name,
            shared=every_key,
            phases=train_single(every_key),
            evaluates_after_aggregation=True,
        )
        self.peft_config = peft_config
        self.settings = settings

    def attach(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: Config
    ) -> AdapterHandle:
        peft_model = get_peft_model(model, self.peft_config(cfg, model), adapter_name=DEFAULT)
        return AdapterHandle(peft_model, self.adapters, is_prompt_parameter)

    def adapter_settings(self, cfg: Config) -> dict[str, object]:
        return {"prompt": cfg.baselines.model_dump(mode="json", include=self.settings)}

    def inference(self) -> str:
        return (
            "PEFT prompt learning: the adapter's virtual-token embeddings (for P-tuning the "
            "prompt encoder's output for them) prepended to the input's token embeddings"
        )


class FedPrompt(PromptMethod):
    """FedPrompt: FedAvg of a PEFT soft prompt; the global prompt served to every client."""

    def __init__(self) -> None:
        super().__init__(
            "fedprompt",
            prompt_tuning_config,
            {"num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"},
        )

    def attach(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: Config
    ) -> AdapterHandle:
        handle = super().attach(model, tokenizer, cfg)
        if cfg.baselines.prompt_tuning_init == "text":
            init_from_text(handle, tokenizer, cfg.baselines.prompt_tuning_init_text or "")
        return handle


def prompt_tuning_config(cfg: Config, model: PreTrainedModel) -> PromptTuningConfig:
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.baselines.num_virtual_tokens,
        prompt_tuning_init=PEFT_INIT[cfg.baselines.prompt_tuning_init],
    )


@torch.no_grad()
def init_from_text(handle: AdapterHandle, tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """Start the soft prompt at the token embeddings of ``text``, repeated or cut to length."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"baselines.prompt_tuning_init_text {text!r} has no tokens")
    embedding = handle.model.prompt_encoder[DEFAULT].embedding
    count = embedding.num_embeddings
    ids = (ids * math.ceil(count / len(ids)))[:count]
    tokens = torch.tensor(ids, device=model_device(handle.model))
    embedding.weight.copy_(handle.model.word_embeddings(tokens))
