"""The ServerApp's per-round logic against a scripted Grid: who is which client, and who is
dropped when a node stays silent past the reply timeout or answers with an error."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import pytest
import torch
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedamole.config import load_config
from fedamole.hmole.keys import state_keys
from fedamole.methods import FedAMoLE
from fedamole.reporting import RunDir
from fedamole.transports.flower.records import (
    identity_to_record,
    payload_from_record,
    update_to_record,
)
from fedamole.transports.flower.server_app import FlowerTransport, Roster, identify_timeout
from fedamole.transports.flower.settings import FlowerSettings
from fedamole.types import ClientUpdate, ServerState

Reply = Callable[[Message], Message | None]  # None: the node never answers


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Inside Flower the runtime sets who is sending; messages cannot be built without it."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class ScriptedGrid:
    """Just the Grid calls the ServerApp makes; each node answers through a scripted function."""

    def __init__(self, nodes: dict[int, Reply]):
        self.nodes = nodes
        self.sent: list[Message] = []
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the real Grid does on push
            self.sent.append(msg)
            reply = self.nodes[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies


def identity(client: int, clients: int = 3) -> Reply:
    return lambda msg: Message(identity_to_record(client, clients), reply_to=msg)


def silent(_msg: Message) -> None:
    return None


def test_roster_maps_nodes_to_clients_and_a_restarted_node_takes_its_client_back(caplog):
    grid = ScriptedGrid({11: identity(0), 22: identity(1), 33: identity(2), 44: silent})
    roster = Roster(num_clients=3)
    roster.refresh(grid)
    assert roster.online(grid) == {0: 11, 1: 22, 2: 33}
    assert grid.timeouts == [identify_timeout(4)]  # 60 s and a little per node asked

    grid.nodes |= {55: identity(1), 66: identity(7, clients=9)}  # client 1 restarted; a stranger
    roster.refresh(grid)
    assert roster.online(grid) == {0: 11, 1: 55, 2: 33}
    assert "node 44 did not say which client it is (no answer in 60.75 s)" in caplog.text
    assert "node 66 has partition-id=7 num-partitions=9" in caplog.text
    queried = [m.metadata.dst_node_id for m in grid.sent]
    assert sorted(queried) == [11, 22, 33, 44, 44, 55, 66]  # only the silent node is asked again
    del grid.nodes[33]  # offline
    assert roster.online(grid) == {0: 11, 1: 55}


def test_with_a_roster_only_its_nodes_get_work_and_only_as_their_own_client(caplog):
    """Node 22 says it is client 0, which node 11 is; node 99 is registered but not on the
    roster and claims client 1. Neither gets a client, and node 99 is never even asked."""
    grid = ScriptedGrid({11: identity(0), 22: identity(0), 33: identity(2), 99: identity(1)})
    roster = Roster(num_clients=3, assigned={11: 0, 22: 1, 33: 2})
    roster.refresh(grid)
    assert roster.online(grid) == {0: 11, 2: 33}
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [11, 22, 33]
    assert "node 99 is not on the roster (roster-file): it gets no work" in caplog.text
    assert "node 22 claims partition-id=0, but the roster makes it client 1" in caplog.text
    roster.refresh(grid)  # nobody is asked twice, nothing changes
    assert len(grid.sent) == 3 and roster.online(grid) == {0: 11, 2: 33}


def _state() -> ServerState:
    archs = [{"m.q_proj": [0, 1]}, {"m.q_proj": [1, 2]}, {"m.q_proj": [0, 2]}, {"m.q_proj": [1, 2]}]
    keys = {k for arch in archs for k in state_keys(arch)}
    return ServerState(
        round=4,
        store={k: torch.ones(2, 3) for k in keys},
        lr=0.5,
        participants=[0, 1, 2, 3],
        architectures=dict(enumerate(archs)),
    )


def _train_round(grid: ScriptedGrid, timeout: float, tmp_path) -> dict[int, ClientUpdate]:
    """The transport's training exchange for the 4 clients of ``_state()``."""
    cfg = load_config(None, ["federation.num_clients=4", f"output.dir={tmp_path}"])
    settings = FlowerSettings(cfg, None, False, reply_timeout=timeout, join_timeout=1)
    run_dir = RunDir(tmp_path)
    run_dir.start(cfg, "fedamole")
    transport = FlowerTransport(grid, settings, cfg, "fedamole", run_dir)
    state, method = _state(), FedAMoLE()
    return transport.train(state.round, {c: method.payload(state, c) for c in range(4)})


def trains(client: int) -> Reply:
    def reply(msg: Message) -> Message:
        weights = payload_from_record(msg.content).weights
        update = ClientUpdate(client, weights, num_examples=3, metrics={"val_x": 1.0})
        return Message(update_to_record(update), reply_to=msg)

    return reply


def _fails(msg: Message) -> Message:
    return Message(Error(code=3, reason="ClientApp raised"), reply_to=msg)


def _garbles(msg: Message) -> Message:
    return Message(RecordDict(), reply_to=msg)


def _roster_grid(nodes: dict[int, Reply]) -> ScriptedGrid:
    """A grid whose node n (11, 22, ...) answers the identity query as client n // 11 - 1 and
    then trains through ``nodes[n]``."""

    def answer(node: int) -> Reply:
        return lambda msg: (
            identity(node // 11 - 1, 4)(msg)
            if msg.metadata.message_type == "query"
            else nodes[node](msg)
        )

    return ScriptedGrid({node: answer(node) for node in nodes})


def test_silent_failing_and_garbled_clients_are_dropped_and_the_others_kept(caplog, tmp_path):
    grid = _roster_grid({11: trains(0), 22: silent, 33: _fails, 44: _garbles})
    with caplog.at_level(logging.WARNING, logger="fedamole"):
        updates = _train_round(grid, 7.5, tmp_path)

    assert list(updates) == [0]
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    payload = payload_from_record(sent[0].content)
    assert payload.architecture == {"m.q_proj": [0, 1]} and payload.round == 4
    assert grid.timeouts == [identify_timeout(4), 7.5]
    assert all(m.metadata.ttl == 7.5 and m.metadata.group_id == "4" for m in sent)
    to_client_1 = payload_from_record(sent[1].content).weights
    assert {k for k in to_client_1 if ".experts." in k} == {
        f"m.q_proj.experts.{e}.lora_{part}" for e in (1, 2) for part in "AB"
    }
    dropped = "dropped from this round's train"
    assert f"round 4: client 1 {dropped} (no reply from node 22 within 7.5 s)" in caplog.text
    assert f"round 4: client 2 {dropped} (node 33: ClientApp raised)" in caplog.text
    assert f"round 4: client 3 {dropped} (node 44: unreadable reply" in caplog.text


def test_a_client_without_online_node_is_reported_dropped(caplog, tmp_path):
    grid = _roster_grid({11: trains(0), 22: trains(1)})
    with caplog.at_level(logging.WARNING, logger="fedamole"):
        updates = _train_round(grid, 5, tmp_path)
    assert list(updates) == [0, 1]
    assert "round 4: client 2 dropped from this round's train (no SuperNode online)" in caplog.text
    assert "client 3 dropped from this round's train (no SuperNode online)" in caplog.text
