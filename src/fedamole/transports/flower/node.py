"""What a SuperNode does with the server's messages: build this client exactly as the in-process
transport builds it (same method, model, split of the same data), run the client job, and keep
what must stay on the organisation's machine there.

Private tensors (a baseline's local adapter, say) live in the node's ``state-dir``, one file per
round (``private_round_NNN.safetensors``: the state at the start of that round), so a round that
is sent again after a server restart, or a client sampled again after rounds away, starts from
exactly the right state. In the last round the node also writes its personalised model there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml
from flwr.app import RecordDict, UserConfig
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from fedamole.config import Config
from fedamole.data.pipeline import (
    TaskSplits,
    is_classification,
    prepare_client_splits,
)
from fedamole.data.sources import load_source
from fedamole.data.splits import split_client
from fedamole.federation.client import base_model_scores, evaluate_job, train_job
from fedamole.federation.method import ClientRuntime, FederatedMethod, ModelHandle
from fedamole.files import atomic_save_tensors, atomic_write_text
from fedamole.methods import get_method
from fedamole.reporting import ADAPTER_WEIGHTS
from fedamole.transports.flower.node_config import (
    DATA_PATH,
    MODEL_FOLDER,
    PARTITION_ID,
    STATE_DIR,
    default_state_dir,
    node_client_folder,
)
from fedamole.transports.flower.records import (
    RunInfo,
    evaluation_to_record,
    payload_from_record,
    run_from_record,
    update_to_record,
)
from fedamole.transports.setup import client_runtime
from fedamole.types import ClientEvaluation, ClientPayload, StateDict


def train_reply(content: RecordDict, node_config: UserConfig) -> RecordDict:
    """The round's payload in, this client's update out."""
    node = Node.for_message(content, node_config)
    payload = payload_from_record(content)
    runtime = node.runtime(payload.round)
    update = train_job(node.method, payload, runtime)
    node.save_private(payload.round + 1, runtime.private)
    update.personal_model, update.kept_at = node.keep_personal_model(payload, update.personal_model)
    return update_to_record(update)


def base_scores_reply(content: RecordDict, node_config: UserConfig) -> RecordDict:
    """The frozen base model on this client's test split, as an evaluation."""
    node = Node.for_message(content, node_config)
    scores = base_model_scores(node.cfg, {node.client_id: node.splits()})
    return evaluation_to_record(ClientEvaluation(node.client_id, scores[node.client_id]))


def evaluate_reply(content: RecordDict, node_config: UserConfig) -> RecordDict:
    """The aggregated payload in, this client's evaluation (after its own training) out."""
    node = Node.for_message(content, node_config)
    payload = payload_from_record(content)
    runtime = node.runtime(payload.round + 1)
    evaluation = evaluate_job(node.method, payload, runtime)
    evaluation.personal_model, evaluation.kept_at = node.keep_personal_model(
        payload, evaluation.personal_model
    )
    return evaluation_to_record(evaluation)


@dataclass
class Node:
    """This organisation's client of one run."""

    run: RunInfo
    method: FederatedMethod
    cfg: Config
    client_id: int
    data_path: Path | None
    folder: Path  # this run's private files on this node

    @classmethod
    def for_message(cls, content: RecordDict, node_config: UserConfig) -> Node:
        run = run_from_record(content)
        method, cfg = _method(run.method, run.config.to_yaml())
        client_id = int(node_config[PARTITION_ID])
        data_path = Path(str(node_config[DATA_PATH])) if node_config.get(DATA_PATH) else None
        state_dir = Path(str(node_config.get(STATE_DIR) or default_state_dir()))
        folder = node_client_folder(state_dir, run.run_id, client_id)
        return cls(run, method, cfg, client_id, data_path, folder)

    def runtime(self, round_idx: int) -> ClientRuntime:
        """This client's model and data, with its private state as of the start of ``round_idx``.
        Deployment starts one process per message, so this is rebuilt each time; simulated
        clients of one worker share the model, as in-process ones do."""
        handle, tokenizer = _model(self.run.method, self.cfg.to_yaml())
        runtime = client_runtime(
            self.method, handle, tokenizer, self.cfg, self.client_id, self.splits()
        )
        saved = self._latest_private(round_idx)
        if saved is not None:
            runtime.private = load_file(str(saved))
        return runtime

    def splits(self) -> TaskSplits:
        """This client's data: the organisation's own file, else its partition of the source."""
        if self.data_path:
            return local_splits(self.cfg, self.data_path, self.client_id)
        return _splits(self.cfg.to_yaml())[self.client_id]

    def _latest_private(self, round_idx: int) -> Path | None:
        files = sorted(self.folder.glob("private_round_*.safetensors"))
        usable = [f for f in files if int(f.stem.rsplit("_", 1)[1]) <= round_idx]
        return usable[-1] if usable else None

    def save_private(self, round_idx: int, private: StateDict) -> None:
        """The private state at the start of ``round_idx`` (written then renamed)."""
        if not private:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"private_round_{round_idx:03d}.safetensors"
        atomic_save_tensors(path, private)

    def keep_personal_model(
        self, payload: ClientPayload, model: StateDict | None
    ) -> tuple[StateDict | None, str | None]:
        """Write the last round's personalised model on this node; send it to the server only
        when the method shares it (else it holds tensors that never leave the organisation, and
        the server is told only the folder it is in, to say where to find it)."""
        if model is None:
            return None, None
        folder = self.folder / MODEL_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(folder / ADAPTER_WEIGHTS, model)
        doc = {
            "client": self.client_id,
            "method": self.method.name,
            "round": payload.round,
            **self.method.describe(self.cfg, payload),
        }
        atomic_write_text(folder / self.method.client_model_file, json.dumps(doc, indent=1))
        if self.method.shares_personal_model:
            return model, None
        return None, str(folder.resolve())


# Keyed by strings (a Config is not hashable); one entry, as one process serves one run.
@lru_cache(maxsize=1)
def _method(name: str, cfg_yaml: str) -> tuple[FederatedMethod, Config]:
    method = get_method(name)
    return method, method.configure(_config(cfg_yaml))


@lru_cache(maxsize=1)
def _model(name: str, cfg_yaml: str) -> tuple[ModelHandle, PreTrainedTokenizerBase]:
    method, cfg = _method(name, cfg_yaml)
    return method.build(cfg)


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
