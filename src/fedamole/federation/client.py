"""Client side of one FedAMoLE round (SPEC 3, steps 2-4), independent of how messages travel:
the in-process runner and the Flower ClientApp both call :func:`run_client_round`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedamole.config import Config
from fedamole.data.pipeline import ClientDataset
from fedamole.evaluation import SplitScores, evaluate_examples, split_metrics
from fedamole.federation.training import (
    StepCallback,
    fixed_batches,
    round_seed,
    shuffled_batches,
    train_steps,
)
from fedamole.federation.types import ClientPayload, ClientUpdate
from fedamole.hmole import HMoLEAdapter
from fedamole.rsea.embeddings import compute_embeddings
from fedamole.rsea.privacy import privatize_embeddings


@dataclass
class ClientRuntime:
    """What a client needs besides the payload: the (shared) backbone with HMoLE, its tokenizer,
    the run config and its own data."""

    adapter: HMoLEAdapter
    tokenizer: PreTrainedTokenizerBase
    cfg: Config
    data: ClientDataset


def evaluate_client(runtime: ClientRuntime) -> dict[str, SplitScores]:
    """The personalised model on its own validation and test splits, per example."""
    return {
        split: evaluate_examples(
            runtime.adapter.model,
            runtime.data.prompter,
            getattr(runtime.data.splits, split),
            runtime.cfg.eval,
            runtime.cfg.model.max_length,
            classification=runtime.data.classification,
        )
        for split in ("val", "test")
    }


def run_client_round(
    payload: ClientPayload, runtime: ClientRuntime, on_step: StepCallback | None = None
) -> ClientUpdate:
    """Download -> local training -> local evaluation -> RSEA embeddings -> upload."""
    cfg, data, adapter = runtime.cfg, runtime.data, runtime.adapter
    adapter.set_architecture(payload.architecture)
    adapter.load_state(payload.weights)
    seed = round_seed(cfg.seed, payload.round, data.client_id)
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    pad_id = runtime.tokenizer.pad_token_id
    train_loss = train_steps(
        adapter.model,
        adapter.trainable_parameters(),
        shuffled_batches(data.train, cfg.federation.batch_size, pad_id, generator),
        cfg.federation.local_steps,
        payload.lr,
        cfg.optim,
        aux_loss=adapter.load_balancing_loss,
        on_step=on_step,
    )
    metrics = {"train_loss": train_loss, **split_metrics(evaluate_client(runtime))}
    embeddings = compute_embeddings(adapter, fixed_batches(data.aux, cfg.eval.batch_size, pad_id))
    if cfg.privacy.enabled:
        embeddings = privatize_embeddings(
            embeddings, cfg.privacy.eta, cfg.privacy.clip_norm, generator
        )
    return ClientUpdate(
        client_id=data.client_id,
        weights=adapter.state(),
        num_examples=len(data.train),
        embeddings=embeddings,
        metrics=metrics,
    )
