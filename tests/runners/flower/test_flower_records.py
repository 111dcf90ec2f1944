"""Round dataclasses <-> Flower records: everything crosses, tensors bit-exactly, on the wire."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedamole.config import load_config
from fedamole.federation.types import ClientEmbeddings, ClientPayload, ClientUpdate
from fedamole.hmole.keys import state_keys
from fedamole.runners.flower.records import (
    config_from_record,
    identity_from_record,
    identity_to_record,
    payload_from_record,
    payload_to_record,
    update_from_record,
    update_to_record,
    with_config,
)

ARCH = {"model.layers.0.self_attn.q_proj": [0, 3], "model.layers.1.self_attn.v_proj": [1, 2, 5]}


def _over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise to bytes and back, as a message between two processes."""
    raw = recorddict_to_proto(content).SerializeToString()
    return recorddict_from_proto(ProtoRecordDict.FromString(raw))


def _state(arch: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {key: torch.randn(4, 6, generator=gen) / 3 for key in state_keys(arch)}


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape
        assert torch.equal(got[key].view(torch.int32), tensor.view(torch.int32)), key


def test_payload_round_trips_with_architecture_and_exact_weights():
    payload = ClientPayload(round=3, architecture=ARCH, weights=_state(ARCH), lr=3e-4 * 0.99**3)
    got = payload_from_record(_over_the_wire(payload_to_record(payload)))
    assert (got.round, got.architecture, got.lr) == (payload.round, ARCH, payload.lr)
    _assert_bit_exact(got.weights, payload.weights)


def test_payload_carries_only_the_clients_own_experts():
    content = payload_to_record(ClientPayload(0, ARCH, _state(ARCH), 1e-3))
    experts = {k for k in content.array_records["weights"] if ".experts." in k}
    assert experts == {k for k in state_keys(ARCH) if ".experts." in k}
    assert not any(".experts.4." in k for k in content.array_records["weights"])


@pytest.mark.parametrize("with_embeddings", [True, False])
def test_update_round_trips_weights_embeddings_and_metrics(with_embeddings):
    gen = torch.Generator().manual_seed(1)
    embeddings = ClientEmbeddings(
        data={m: torch.randn(8, generator=gen) for m in ARCH},
        experts={m: {e: torch.randn(8, generator=gen) for e in ids} for m, ids in ARCH.items()},
    )
    update = ClientUpdate(
        client_id=2,
        weights=_state(ARCH),
        num_examples=17,
        embeddings=embeddings if with_embeddings else None,
        metrics={"train_loss": 1 / 3, "val_rougeL": 0.1 + 0.2, "test_rougeL": 0.0},
    )
    got = update_from_record(_over_the_wire(update_to_record(update)))
    assert (got.client_id, got.num_examples, got.metrics) == (2, 17, update.metrics)
    _assert_bit_exact(got.weights, update.weights)
    if not with_embeddings:
        assert got.embeddings is None
        return
    _assert_bit_exact(got.embeddings.data, embeddings.data)
    assert got.embeddings.experts.keys() == embeddings.experts.keys()
    for module, by_expert in embeddings.experts.items():
        assert sorted(got.embeddings.experts[module]) == sorted(by_expert)
        for e, vec in by_expert.items():
            assert torch.equal(got.embeddings.experts[module][e], vec)


def test_config_and_identity_cross_unchanged():
    cfg = load_config(
        None, ["optim.lr=1.0e-5", "federation.rounds=7", "hmole.target_modules=[q_proj]"]
    )
    content = with_config(payload_to_record(ClientPayload(0, ARCH, _state(ARCH), 1.0)), cfg)
    assert config_from_record(_over_the_wire(content)) == cfg
    assert identity_from_record(_over_the_wire(identity_to_record(2, 3))) == (2, 3)
