"""What a SuperNode does with a training message: build this client exactly as the in-process
runner builds it (same model, same split of the same data) and run :func:`run_client_round`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from flwr.app import RecordDict, UserConfig
from transformers import PreTrainedTokenizerBase

from fedamole.config import Config
from fedamole.data.pipeline import (
    TaskSplits,
    encode_client,
    is_classification,
    prepare_client_splits,
)
from fedamole.data.prompts import build_prompter
from fedamole.data.sources import load_source
from fedamole.data.splits import split_client
from fedamole.federation.client import ClientRuntime, run_client_round
from fedamole.hmole import HMoLEAdapter
from fedamole.personalised import build_hmole_model
from fedamole.runners.flower.records import (
    config_from_record,
    payload_from_record,
    update_to_record,
)
from fedamole.runners.flower.settings import DATA_PATH, PARTITION_ID


def train_reply(content: RecordDict, node_config: UserConfig) -> RecordDict:
    """The round's payload in, this client's update out."""
    data_path = Path(str(node_config[DATA_PATH])) if node_config.get(DATA_PATH) else None
    runtime = client_runtime(config_from_record(content), int(node_config[PARTITION_ID]), data_path)
    return update_to_record(run_client_round(payload_from_record(content), runtime))


def client_runtime(cfg: Config, client_id: int, data_path: Path | None) -> ClientRuntime:
    """This client's model and data. Deployment starts one process per message, so this is
    rebuilt each round; simulated clients of one worker share the model, as in-process ones do."""
    key = cfg.to_yaml()
    adapter, tokenizer = _model(key)
    splits = local_splits(cfg, data_path, client_id) if data_path else _splits(key)[client_id]
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    return ClientRuntime(
        adapter, tokenizer, cfg, encode_client(client_id, splits, prompter, cfg.model.max_length)
    )


# Keyed by the config's YAML (a Config is not hashable); one entry, as one run uses one config.
@lru_cache(maxsize=1)
def _model(cfg_yaml: str) -> tuple[HMoLEAdapter, PreTrainedTokenizerBase]:
    return build_hmole_model(_config(cfg_yaml))


@lru_cache(maxsize=1)
def _splits(cfg_yaml: str) -> list[TaskSplits]:
    return prepare_client_splits(_config(cfg_yaml))


def _config(cfg_yaml: str) -> Config:
    return Config.model_validate(yaml.safe_load(cfg_yaml))


def local_splits(cfg: Config, path: Path, client_id: int) -> TaskSplits:
    """An organisation's own file, split like a partition; read as JSONL when the run's source
    is synthetic, else in the run's source format."""
    source = "jsonl" if cfg.data.source == "synthetic" else cfg.data.source
    examples = load_source(cfg.data.model_copy(update={"source": source, "path": path}), cfg.seed)
    classification = is_classification(examples)
    splits = split_client(
        examples,
        cfg.data,
        cfg.seed + client_id,
        classification,
        name=f"client {client_id} ({path})",
    )
    return TaskSplits(splits, classification)
