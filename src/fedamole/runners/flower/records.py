"""The round dataclasses as Flower records and back: the only place that knows the wire layout.

A payload is ``weights`` (one flat ArrayRecord keyed by the HMoLE state key names, holding only
what this client's architecture needs), ``architecture`` (module -> expert ids) and ``round``
(round index and learning rate); the server adds ``run`` (the run's validated config as YAML) so
every client trains with exactly the server's settings. An update adds ``metrics``, ``update``
(client id, example count) and, when present, the RSEA embeddings as two ArrayRecords. Tensors
travel as NumPy arrays, which is bit-exact for every dtype NumPy has (float32 weights and
embeddings). A node answers the server's ``identity`` query with its partition from node config.
"""

from __future__ import annotations

import yaml
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedamole.config import Config
from fedamole.federation.types import ClientEmbeddings, ClientPayload, ClientUpdate, StateDict

WEIGHTS = "weights"
ARCHITECTURE = "architecture"
ROUND = "round"
UPDATE = "update"
METRICS = "metrics"
DATA_EMBEDDINGS = "data-embeddings"
EXPERT_EMBEDDINGS = "expert-embeddings"
RUN = "run"
IDENTITY = "identity"
_EXPERT_SEP = ".experts."  # "{module}.experts.{e}", the prefix of that expert's state keys


def _arrays(tensors: dict[str, Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: t.detach().contiguous() for k, t in tensors.items()})


def _tensors(record: ArrayRecord) -> StateDict:
    return dict(record.to_torch_state_dict())


def payload_to_record(payload: ClientPayload) -> RecordDict:
    """Server -> client: this client's architecture and the current weights of what it holds."""
    return RecordDict(
        {
            WEIGHTS: _arrays(payload.weights),
            ARCHITECTURE: ConfigRecord(dict(payload.architecture)),
            ROUND: ConfigRecord({"round": payload.round, "lr": payload.lr}),
        }
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


def _embeddings_to_records(emb: ClientEmbeddings) -> dict[str, ArrayRecord]:
    experts = {
        f"{module}{_EXPERT_SEP}{e}": vec
        for module, by_expert in emb.experts.items()
        for e, vec in by_expert.items()
    }
    return {DATA_EMBEDDINGS: _arrays(emb.data), EXPERT_EMBEDDINGS: _arrays(experts)}


def _embeddings_from_records(content: RecordDict) -> ClientEmbeddings | None:
    if DATA_EMBEDDINGS not in content.array_records:
        return None
    experts: dict[str, dict[int, Tensor]] = {}
    for key, vec in _tensors(content.array_records[EXPERT_EMBEDDINGS]).items():
        module, _, expert = key.rpartition(_EXPERT_SEP)
        experts.setdefault(module, {})[int(expert)] = vec
    return ClientEmbeddings(data=_tensors(content.array_records[DATA_EMBEDDINGS]), experts=experts)


def update_to_record(update: ClientUpdate) -> RecordDict:
    """Client -> server: trained weights, example count, metrics and (optional) embeddings."""
    records = {
        WEIGHTS: _arrays(update.weights),
        UPDATE: ConfigRecord({"client-id": update.client_id, "num-examples": update.num_examples}),
        METRICS: MetricRecord(dict(update.metrics)),
    }
    if update.embeddings is not None:
        records |= _embeddings_to_records(update.embeddings)
    return RecordDict(records)


def update_from_record(content: RecordDict) -> ClientUpdate:
    info = content.config_records[UPDATE]
    return ClientUpdate(
        client_id=int(info["client-id"]),
        weights=_tensors(content.array_records[WEIGHTS]),
        num_examples=int(info["num-examples"]),
        embeddings=_embeddings_from_records(content),
        metrics=dict(content.metric_records[METRICS]),
    )


def with_config(content: RecordDict, cfg: Config) -> RecordDict:
    """Attach the run's config to a payload (small next to the weights; keeps clients stateless)."""
    content[RUN] = ConfigRecord({"config": cfg.to_yaml()})
    return content


def config_from_record(content: RecordDict) -> Config:
    return Config.model_validate(yaml.safe_load(str(content.config_records[RUN]["config"])))


def identity_to_record(partition_id: int, num_partitions: int) -> RecordDict:
    """A node's answer to "who are you": the partition (client id) its operator configured."""
    return RecordDict(
        {IDENTITY: ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})}
    )


def identity_from_record(content: RecordDict) -> tuple[int, int]:
    identity = content.config_records[IDENTITY]
    return int(identity["partition-id"]), int(identity["num-partitions"])
