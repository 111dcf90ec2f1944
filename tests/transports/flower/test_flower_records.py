"""Round dataclasses <-> Flower records: everything crosses, tensors bit-exactly, on the wire."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedamole.config import load_config
from fedamole.hmole.keys import state_keys
from fedamole.transports.flower.records import (
    RunInfo,
    asks_for_base_scores,
    base_scores_request,
    evaluation_from_record,
    evaluation_to_record,
    identity_from_record,
    identity_to_record,
    payload_from_record,
    payload_to_record,
    run_from_record,
    update_from_record,
    update_to_record,
)
from fedamole.types import (
    ClientEmbeddings,
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    to_wire,
)

ARCH = {"model.layers.0.self_attn.q_proj": [0, 3], "model.layers.1.self_attn.v_proj": [1, 2, 5]}
RUN = RunInfo(load_config(None, []), "fedamole", "run-1")


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
        bits = torch.int16 if tensor.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got[key].view(bits), tensor.view(bits)), key


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
def test_payload_round_trips_with_architecture_and_exact_weights(wire_dtype):
    weights = to_wire(_state(ARCH), wire_dtype)
    payload = ClientPayload(round=3, architecture=ARCH, weights=weights, lr=3e-4 * 0.99**3)
    got = payload_from_record(_over_the_wire(payload_to_record(payload, RUN)))
    assert (got.round, got.architecture, got.lr) == (payload.round, ARCH, payload.lr)
    _assert_bit_exact(got.weights, payload.weights)


def test_bfloat16_weights_take_half_the_bytes_on_the_wire():
    sizes = {
        dtype: len(
            recorddict_to_proto(
                payload_to_record(ClientPayload(0, ARCH, to_wire(_state(ARCH), dtype), 1.0), RUN)
            ).SerializeToString()
        )
        for dtype in ("float32", "bfloat16")
    }
    tensor_bytes = sum(t.numel() for t in _state(ARCH).values()) * 2  # what bf16 saves
    assert sizes["float32"] - sizes["bfloat16"] >= tensor_bytes


def test_payload_carries_only_the_clients_own_experts():
    content = payload_to_record(ClientPayload(0, ARCH, _state(ARCH), 1e-3), RUN)
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
        example_scores={"test_rougeL": [0.0, 1 / 3, 1.0], "val_rougeL": []},
        personal_model=_state(ARCH),
    )
    got = update_from_record(_over_the_wire(update_to_record(update)))
    assert (got.client_id, got.num_examples, got.metrics) == (2, 17, update.metrics)
    assert got.example_scores == {"test_rougeL": [0.0, 1 / 3, 1.0]}  # empty lists stay home
    _assert_bit_exact(got.personal_model, update.personal_model)
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


def test_evaluation_round_trips_without_a_personal_model():
    evaluation = ClientEvaluation(1, {"test_accuracy": 0.5}, {"test_accuracy": [0.0, 1.0]})
    got = evaluation_from_record(_over_the_wire(evaluation_to_record(evaluation)))
    assert got == evaluation


def test_run_and_identity_cross_unchanged():
    cfg = load_config(
        None, ["optim.lr=1.0e-5", "federation.rounds=7", "hmole.target_modules=[q_proj]"]
    )
    run = RunInfo(cfg, "fedit", "abc123")
    content = payload_to_record(ClientPayload(0, {}, {}, 1.0), run)
    assert run_from_record(_over_the_wire(content)) == run
    assert identity_from_record(_over_the_wire(identity_to_record(2, 3))) == (2, 3)


def test_where_a_node_keeps_a_model_it_does_not_send_crosses():
    """The folder a node reports for a private personalised model reaches the server."""
    update = ClientUpdate(2, {}, 5, metrics={"train_loss": 1.0}, kept_at="/srv/node/run/client2")
    assert update_from_record(_over_the_wire(update_to_record(update))).kept_at == update.kept_at
    evaluation = ClientEvaluation(2, {"test_accuracy": 0.5}, kept_at="/srv/node/run/client2")
    got = evaluation_from_record(_over_the_wire(evaluation_to_record(evaluation)))
    assert got == evaluation


def test_a_base_scores_query_carries_the_run_and_an_identity_query_does_not():
    request = _over_the_wire(base_scores_request(RUN))
    assert asks_for_base_scores(request) and run_from_record(request) == RUN
    assert not asks_for_base_scores(_over_the_wire(RecordDict()))
