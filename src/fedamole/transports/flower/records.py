"""The wire dataclasses as Flower records and back: the only place that knows the wire layout.

A payload is ``weights`` (one flat ArrayRecord keyed by state key names, holding only what this
client needs), ``architecture`` (module -> expert ids; empty for methods without experts) and
``round`` (round index and learning rate); the server adds ``run`` (the validated config as
YAML, the method and the run id) so every client works with exactly the server's settings. An
update adds ``metrics``, ``example-scores``, ``update`` (client id, example count), the RSEA
embeddings when present, and in the last round the personalised model when the method shares it.
An evaluation carries metrics, example scores and that model. A node answers the server's
``identity`` query with its partition from node config.

Tensors travel bit-exactly: float32 as NumPy arrays, bfloat16 (``federation.wire_dtype``, which
NumPy lacks) as raw bytes with dtype "bfloat16".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedamole.config import Config
from fedamole.types import (
    ClientEmbeddings,
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    StateDict,
)

WEIGHTS = "weights"
ARCHITECTURE = "architecture"
ROUND = "round"
UPDATE = "update"
METRICS = "metrics"
EXAMPLE_SCORES = "example-scores"
PERSONAL_MODEL = "personal-model"
EMBEDDINGS = "embeddings"  # ClientEmbeddings.to_tensors(), the checkpoint's layout too
RUN = "run"
IDENTITY = "identity"
_BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class RunInfo:
    """What every message from the server carries besides its payload."""

    config: Config
    method: str
    run_id: str


def _array(tensor: Tensor) -> Array:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        raw = tensor.view(torch.int16).numpy().tobytes()
        return Array(_BFLOAT16, tuple(tensor.shape), "raw", raw)
    return Array(tensor.numpy())


def _tensor(array: Array) -> Tensor:
    if array.dtype == _BFLOAT16:
        flat = torch.frombuffer(bytearray(array.data), dtype=torch.bfloat16)
        return flat.reshape(array.shape)
    return torch.from_numpy(array.numpy())


def _arrays(tensors: StateDict) -> ArrayRecord:
    record = ArrayRecord()
    for key, tensor in tensors.items():
        record[key] = _array(tensor)
    return record


def _tensors(record: ArrayRecord) -> StateDict:
    return {key: _tensor(record[key]) for key in record}


def payload_to_record(payload: ClientPayload, run: RunInfo) -> RecordDict:
    """Server -> client: the architecture, the weights it needs, the round and the run."""
    return RecordDict(
        {
            WEIGHTS: _arrays(payload.weights),
            ARCHITECTURE: ConfigRecord(dict(payload.architecture)),
            ROUND: ConfigRecord({"round": payload.round, "lr": payload.lr}),
            RUN: _run_record(run),
        }
    )


def base_scores_request(run: RunInfo) -> RecordDict:
    """Server -> client: score the frozen base model on your test split (``eval.base_model``);
    a query that carries the run, where the identity query carries nothing."""
    return RecordDict({RUN: _run_record(run)})


def asks_for_base_scores(content: RecordDict) -> bool:
    return RUN in content.config_records


def _run_record(run: RunInfo) -> ConfigRecord:
    return ConfigRecord(
        {"config": run.config.to_yaml(), "method": run.method, "run-id": run.run_id}
    )


def payload_from_record(content: RecordDict) -> ClientPayload:
    round_info = content.config_records[ROUND]
    return ClientPayload(
        round=int(round_info["round"]),
        architecture={
            m: [int(e) for e in ids] for m, ids in content.config_records[ARCHITECTURE].items()
        },
        weights=_tensors(content.array_records[WEIGHTS]),
        lr=float(round_info["lr"]),
    )


def run_from_record(content: RecordDict) -> RunInfo:
    run = content.config_records[RUN]
    return RunInfo(
        config=Config.model_validate(yaml.safe_load(str(run["config"]))),
        method=str(run["method"]),
        run_id=str(run["run-id"]),
    )


def _embeddings_from_records(content: RecordDict) -> ClientEmbeddings | None:
    record = content.array_records.get(EMBEDDINGS)
    return None if record is None else ClientEmbeddings.from_tensors(_tensors(record))


def _results(
    metrics: dict[str, float], scores: dict[str, list[float]], model: StateDict | None
) -> dict[str, MetricRecord | ArrayRecord]:
    """Metrics, per-example scores (empty lists are left out: Flower cannot type them) and the
    optional personalised model."""
    records: dict[str, MetricRecord | ArrayRecord] = {
        METRICS: MetricRecord(dict(metrics)),
        EXAMPLE_SCORES: MetricRecord({k: list(v) for k, v in scores.items() if v}),
    }
    if model is not None:
        records[PERSONAL_MODEL] = _arrays(model)
    return records


def _personal_model(content: RecordDict) -> StateDict | None:
    record = content.array_records.get(PERSONAL_MODEL)
    return None if record is None else _tensors(record)


def _kept_at(folder: str | None) -> dict[str, str]:
    return {} if folder is None else {"kept-at": folder}


def _kept_at_of(content: RecordDict) -> str | None:
    folder = content.config_records[UPDATE].get("kept-at")
    return None if folder is None else str(folder)


def _scores(content: RecordDict) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in content.metric_records[EXAMPLE_SCORES].items()}


def update_to_record(update: ClientUpdate) -> RecordDict:
    """Client -> server: trained weights, example count, metrics, scores, (optional) embeddings."""
    records = {
        WEIGHTS: _arrays(update.weights),
        UPDATE: ConfigRecord(
            {"client-id": update.client_id, "num-examples": update.num_examples}
            | _kept_at(update.kept_at)
        ),
        **_results(update.metrics, update.example_scores, update.personal_model),
    }
    if update.embeddings is not None:
        records[EMBEDDINGS] = _arrays(update.embeddings.to_tensors())
    return RecordDict(records)


def update_from_record(content: RecordDict) -> ClientUpdate:
    info = content.config_records[UPDATE]
    return ClientUpdate(
        client_id=int(info["client-id"]),
        weights=_tensors(content.array_records[WEIGHTS]),
        num_examples=int(info["num-examples"]),
        embeddings=_embeddings_from_records(content),
        metrics=dict(content.metric_records[METRICS]),
        example_scores=_scores(content),
        personal_model=_personal_model(content),
        kept_at=_kept_at_of(content),
    )


def evaluation_to_record(evaluation: ClientEvaluation) -> RecordDict:
    records = {
        UPDATE: ConfigRecord({"client-id": evaluation.client_id} | _kept_at(evaluation.kept_at)),
        **_results(evaluation.metrics, evaluation.example_scores, evaluation.personal_model),
    }
    return RecordDict(records)


def evaluation_from_record(content: RecordDict) -> ClientEvaluation:
    return ClientEvaluation(
        client_id=int(content.config_records[UPDATE]["client-id"]),
        metrics=dict(content.metric_records[METRICS]),
        example_scores=_scores(content),
        personal_model=_personal_model(content),
        kept_at=_kept_at_of(content),
    )


def identity_to_record(partition_id: int, num_partitions: int) -> RecordDict:
    """A node's answer to "who are you": the partition (client id) its operator configured."""
    return RecordDict(
        {IDENTITY: ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})}
    )


def identity_from_record(content: RecordDict) -> tuple[int, int]:
    identity = content.config_records[IDENTITY]
    return int(identity["partition-id"]), int(identity["num-partitions"])
