"""FedPTuning: P-tuning (Liu et al., "GPT Understands, Too") federated with FedAvg, the
FedPTuning baseline of the FedAMoLE paper, on PEFT's ``PromptEncoderConfig``.

A prompt encoder (``baselines.ptuning_encoder``: PEFT's MLP, three linear layers with ReLU, or a
bidirectional LSTM followed by a two-layer MLP; width ``baselines.ptuning_hidden_size``, by
default the backbone's hidden size) maps a table of ``baselines.num_virtual_tokens`` trainable
embeddings to the virtual-token embeddings prepended to every input. Each round a client trains
the table and the encoder for ``federation.local_steps`` steps with the shared loop and uploads
both; the server averages every one of their tensors (FedAvg) and every client is served the
aggregate, evaluated after aggregation. Everything else is FedPrompt's
(:mod:`fedamole.methods.fedprompt`): only the adapter differs.

The state that travels is the encoder's parameters, not PEFT's saved form of a P-tuning adapter
(``prompt_embeddings``, the encoder's output), which could not be trained further.
"""

from __future__ import annotations

from peft import PromptEncoderConfig, PromptEncoderReparameterizationType
from transformers import PreTrainedModel

from fedamole.config import Config
from fedamole.methods.fedprompt import PromptMethod

ENCODERS = {
    "mlp": PromptEncoderReparameterizationType.MLP,
    "lstm": PromptEncoderReparameterizationType.LSTM,
}


def ptuning_config(cfg: Config, model: PreTrainedModel) -> PromptEncoderConfig:
    settings = cfg.baselines
    return PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_reparameterization_type=ENCODERS[settings.ptuning_encoder],
        encoder_hidden_size=settings.ptuning_hidden_size or model.config.hidden_size,
    )


def fedptuning() -> PromptMethod:
    """FedPTuning: FedAvg of a P-tuning prompt encoder; the global encoder served to everyone."""
    return PromptMethod(
        "fedptuning",
        ptuning_config,
        {"num_virtual_tokens", "ptuning_encoder", "ptuning_hidden_size"},
    )
