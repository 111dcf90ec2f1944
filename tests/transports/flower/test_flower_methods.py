"""Every method added since the Flower tests were written, over the Flower apps' real messages:
the ServerApp's loop (`run_federation`) against a Grid whose nodes answer with the ClientApp's own
handlers (`node.train_reply`, `evaluate_reply`) in this process. What crosses is Flower
`Message`s built from fedamole's records; what stays on a node stays in its state directory.
The outcome must be the in-process run's. (The real processes, SuperLink, SuperNodes and Ray, are
the deployment and simulation tests' business; each message there costs a fresh process.)"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from flwr.app import Message
from safetensors.torch import load_file
from same_run import records_of
from test_flower_server_loop import ScriptedGrid, serverapp_identity  # noqa: F401 - fixture
from tiny_run import TINY_RUN

from fedamole.config import load_config
from fedamole.methods import get_method
from fedamole.reporting import RunDir
from fedamole.transports.flower.node import evaluate_reply, train_reply
from fedamole.transports.flower.node_config import (
    MODEL_FOLDER,
    NUM_PARTITIONS,
    PARTITION_ID,
    STATE_DIR,
    node_client_folder,
)
from fedamole.transports.flower.records import identity_to_record
from fedamole.transports.flower.server_app import run_federation
from fedamole.transports.flower.settings import FlowerSettings
from fedamole.transports.in_process import run_in_process

CLIENTS = 2
TINY = [*TINY_RUN, f"federation.num_clients={CLIENTS}", "federation.rounds=2"]
REPLIES = {"train": train_reply, "evaluate": evaluate_reply}


def node(client: int, state_dir) -> Callable[[Message], Message]:
    """Node ``100 + client``: says who it is, then runs the ClientApp's handlers."""
    config = {PARTITION_ID: client, NUM_PARTITIONS: CLIENTS, STATE_DIR: str(state_dir)}

    def answer(msg: Message) -> Message:
        kind = msg.metadata.message_type
        if kind == "query":
            return Message(identity_to_record(client, CLIENTS), reply_to=msg)
        return Message(REPLIES[kind](msg.content, config), reply_to=msg)

    return answer


@pytest.mark.parametrize("method", ["fedsa-lora", "fedit-wide", "fedalt", "fedlease"])
def test_method_over_flower_messages_equals_the_in_process_run(method, tmp_path):
    out, reference, state_dir = tmp_path / "flower", tmp_path / "in-process", tmp_path / "nodes"
    cfg = load_config(None, [*TINY, f"output.dir={out}"])
    grid = ScriptedGrid({100 + c: node(c, state_dir) for c in range(CLIENTS)})
    run_federation(grid, FlowerSettings(cfg, method, False, reply_timeout=60, join_timeout=5))
    run_in_process(load_config(None, [*TINY, f"output.dir={reference}"]), method=method)

    assert records_of(out) == records_of(reference)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, reference)]
    for summary in summaries:
        summary.pop("wall_time_s")
    assert summaries[0] == summaries[1]
    run_id = RunDir(out).run_id
    for c in range(CLIENTS):
        expected = load_file(str(reference / "clients" / str(c) / "adapter.safetensors"))
        kept = out / "clients" / str(c) / "adapter.safetensors"
        if not get_method(method).shares_personal_model:  # it never left the node
            assert not kept.exists()
            kept = node_client_folder(state_dir, run_id, c) / MODEL_FOLDER / kept.name
        got = load_file(str(kept))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
