"""From a data config to per-client, tokenised splits: source -> partition -> splits -> tokens.

Everything here runs (and fails with a clear DataError) before any training starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedamole.config import Config
from fedamole.data.example import DataError, Example
from fedamole.data.partition import partition_examples
from fedamole.data.prompts import Prompter
from fedamole.data.sources import load_source
from fedamole.data.splits import ClientSplits, split_client
from fedamole.data.tokenize import encode_split

log = logging.getLogger("fedamole.data")


@dataclass(frozen=True)
class TaskSplits:
    """One client's splits and the task type of the whole data set they were drawn from.

    `classification` (every example of the data set has answer choices) decides the metric, so
    every split of every client of a run is scored the same way, however the examples fell."""

    splits: ClientSplits
    classification: bool


@dataclass
class ClientDataset:
    """One client's private data: raw splits for evaluation, tokenised train and aux for training
    and RSEA embeddings, the prompt format they were tokenised with and the data set's task type
    (see :class:`TaskSplits`)."""

    client_id: int
    splits: ClientSplits
    train: list[dict[str, list[int]]]
    aux: list[dict[str, list[int]]]
    prompter: Prompter
    classification: bool


def is_classification(examples: list[Example]) -> bool:
    """Classification data (every example has answer choices) is scored by accuracy."""
    return bool(examples) and all(ex.choices for ex in examples)


def prepare_client_splits(cfg: Config) -> list[TaskSplits]:
    """Load, partition and split the data: every data error surfaces here, before the model loads.
    The task type is decided once, on the whole data set."""
    examples = load_source(cfg.data, cfg.seed)
    classification = is_classification(examples)
    partitions = partition_examples(examples, cfg.data, cfg.federation.num_clients, cfg.seed)
    return [
        TaskSplits(
            split_client(part, cfg.data, cfg.seed + cid, classification, name=f"client {cid}"),
            classification,
        )
        for cid, part in enumerate(partitions)
    ]


def encode_client(
    client_id: int, task: TaskSplits, prompter: Prompter, max_length: int
) -> ClientDataset:
    """Tokenise one client's train and aux splits; over-long examples are dropped and counted."""
    splits = task.splits
    train, dropped_train = encode_split(prompter, splits.train, max_length)
    aux, dropped_aux = encode_split(prompter, splits.aux, max_length)
    if not train or not aux:
        raise DataError(
            f"client {client_id}: no training or auxiliary example fits model.max_length="
            f"{max_length} tokens; raise model.max_length"
        )
    if dropped_train or dropped_aux:
        log.info(
            "client %d: dropped %d train / %d aux examples longer than %d tokens",
            client_id,
            dropped_train,
            dropped_aux,
            max_length,
        )
    return ClientDataset(client_id, splits, train, aux, prompter, task.classification)
