"""The fedamole ServerApp: the round engine with Flower's Message API as the transport between
the server and the organisations' SuperNodes.

Each round the engine hands :class:`FlowerTransport` one payload per participating client; the
transport sends each online client its own (for FedAMoLE: its experts, the shared experts and
routers), waits at most ``reply-timeout`` seconds, and returns whoever answered. Methods that
serve the aggregated model get a second, evaluation message after aggregation. A dropped client
rejoins by coming back online: the server asks new SuperNodes for their ``partition-id`` and
sends them their payloads from then on. ``resume = true`` continues ``output.dir`` from its last
checkpoint, e.g. after the SuperLink or the ServerApp was restarted.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.config import get_project_dir
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from rich.console import Console

from fedamole.config import Config
from fedamole.federation.engine import Engine
from fedamole.reporting import RunDir
from fedamole.transports.flower.records import (
    RunInfo,
    base_scores_request,
    evaluation_from_record,
    identity_from_record,
    payload_to_record,
    update_from_record,
)
from fedamole.transports.flower.settings import FlowerSettings, NodeRoster, load_settings
from fedamole.transports.setup import open_run
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    ServerState,
    StateDict,
)

log = logging.getLogger("fedamole.flower")

app = ServerApp()

IDENTIFY_TIMEOUT = 60.0  # s; answering "which client are you" needs no model, only a process
# s more per node asked at once: on the Simulation Engine a few workers answer the queries in
# turn (~0.05 s each measured for 1,000 virtual nodes on 2 CPUs); SuperNodes answer in parallel.
IDENTIFY_PER_NODE = 0.25


def identify_timeout(nodes: int) -> float:
    """How long a refresh waits for ``nodes`` new nodes to say which client they are."""
    return IDENTIFY_TIMEOUT + IDENTIFY_PER_NODE * nodes


Reply = TypeVar("Reply", ClientUpdate, ClientEvaluation)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the run's config; ``config-file`` is relative to the app."""
    _log_to_run_stream()
    run_federation(grid, load_settings(context.run_config, _app_dir(grid.run)))


def _app_dir(run: Run) -> Path:
    """Where the FAB was installed; the working directory for a simulation launched from Python
    (:mod:`fedamole.transports.flower.simulation`), which has no FAB."""
    if not run.fab_id:
        return Path.cwd()
    return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)


def _log_to_run_stream() -> None:
    """Flower forwards the ServerApp's stdout to ``flwr run --stream`` / ``flwr log``."""
    logger = logging.getLogger("fedamole")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@dataclass
class Roster:
    """Which SuperNode is which client.

    With the operator's ``assigned`` roster (node id -> client id, from ``roster-file``) a node
    holds only the client the operator gave it, and only while its own ``partition-id`` agrees;
    any other node gets no work and is named in the log. With self-declared partitions
    (``assigned`` None, local experiments only) each node is the client it says it is and the
    latest claim wins, which is how a restarted SuperNode with a new node id takes its client
    back. Either way one client has at most one node.
    """

    num_clients: int
    assigned: NodeRoster | None = None
    # node id -> client id, in the order nodes were identified; None: a node that gets no work
    clients: dict[int, int | None] = field(default_factory=dict)

    def refresh(self, grid: Grid) -> None:
        """Ask every online node not met yet which client it is; silent ones are asked again
        at the next refresh. Nodes off the roster are not asked: they get no message at all."""
        new = [node for node in grid.get_node_ids() if node not in self.clients]
        for node in [n for n in new if self.assigned is not None and n not in self.assigned]:
            log.error("node %d is not on the roster (roster-file): it gets no work", node)
            self.clients[node] = None
        new = [node for node in new if node not in self.clients]
        if not new:
            return
        timeout = identify_timeout(len(new))
        queries = {
            node: Message(
                RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, ttl=timeout
            )
            for node in new
        }
        replies = dict(_replies_by_request(grid, queries, timeout))
        for node in new:
            reply = replies.get(node)
            if reply is None or reply.has_error():
                reason = reply.error.reason if reply else f"no answer in {timeout:g} s"
                log.warning("node %d did not say which client it is (%s)", node, reason)
            else:
                self.clients[node] = self._client_of(node, *identity_from_record(reply.content))

    def _client_of(self, node: int, client: int, num_partitions: int) -> int | None:
        if num_partitions != self.num_clients or not 0 <= client < num_partitions:
            log.error(
                "node %d has partition-id=%d num-partitions=%d, but this run has "
                "federation.num_clients=%d; the node is ignored",
                node,
                client,
                num_partitions,
                self.num_clients,
            )
            return None
        if self.assigned is not None and self.assigned[node] != client:
            log.error(
                "node %d claims partition-id=%d, but the roster makes it client %d: it gets "
                "no work (fix the roster or the node's --node-config)",
                node,
                client,
                self.assigned[node],
            )
            return None
        for other, held in self.clients.items():
            if held == client:
                log.warning(
                    "node %d claims client %d, which node %d held: the newer claim wins "
                    "(self-declared partitions)",
                    node,
                    client,
                    other,
                )
        log.info("node %d is client %d", node, client)
        return client

    def online(self, grid: Grid) -> dict[int, int]:
        """client id -> node id for the clients whose node is online (latest claim wins)."""
        online = set(grid.get_node_ids())
        return {c: node for node, c in self.clients.items() if c is not None and node in online}

    def wait_for_all(self, grid: Grid, join_timeout: float) -> None:
        """Give every organisation up to ``join_timeout`` s to connect before the first round."""
        deadline = time.monotonic() + join_timeout
        while True:
            self.refresh(grid)
            missing = sorted(set(range(self.num_clients)) - set(self.online(grid)))
            if not missing:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "starting without clients %s: not connected after %g s", missing, join_timeout
                )
                return
            time.sleep(1.0)


def _replies_by_request(
    grid: Grid, requests: dict[int, Message], timeout: float
) -> list[tuple[int, Message]]:
    """Send, wait at most ``timeout`` s, and pair each reply with its request's key.

    Replies are matched by message id, not sender, because a reply the SuperLink writes for an
    unreachable node comes from the SuperLink itself.
    """
    replies = list(grid.send_and_receive(list(requests.values()), timeout=timeout))
    keys = {msg.metadata.message_id: key for key, msg in requests.items()}
    return [
        (keys[r.metadata.reply_to_message_id], r)
        for r in replies
        if r.metadata.reply_to_message_id in keys
    ]


class FlowerTransport:
    """The engine's clients are the organisations' SuperNodes; their private tensors stay there."""

    def __init__(
        self, grid: Grid, settings: FlowerSettings, cfg: Config, method: str, run_dir: RunDir
    ) -> None:
        self.grid = grid
        self.settings = settings
        self.cfg = cfg
        self.method = method
        self.run_dir = run_dir
        self.roster = Roster(cfg.federation.num_clients, settings.roster)

    def connect(self) -> None:
        self.roster.wait_for_all(self.grid, self.settings.join_timeout)

    def train(self, round_idx: int, payloads: dict[int, ClientPayload]) -> dict[int, ClientUpdate]:
        return self._exchange(MessageType.TRAIN, round_idx, payloads, update_from_record)

    def evaluate(
        self, round_idx: int, payloads: dict[int, ClientPayload]
    ) -> dict[int, ClientEvaluation]:
        return self._exchange(MessageType.EVALUATE, round_idx, payloads, evaluation_from_record)

    def base_scores(self) -> dict[int, Metrics]:
        """Each online client scores the frozen base model on its own test split (a query that
        carries the run); a node that does not answer in ``reply-timeout`` is left out."""
        self.roster.refresh(self.grid)
        nodes = self.roster.online(self.grid)
        timeout = self.settings.reply_timeout
        request = base_scores_request(RunInfo(self.cfg, self.method, self.run_dir.run_id))
        queries = {
            c: Message(request, dst_node_id=node, message_type=MessageType.QUERY, ttl=timeout)
            for c, node in sorted(nodes.items())
        }
        scores = {}
        for c, reply in _replies_by_request(self.grid, queries, timeout):
            if reply.has_error():
                log.warning("client %d: no base-model scores (%s)", c, reply.error.reason)
                continue
            scores[c] = evaluation_from_record(reply.content).metrics
        return dict(sorted(scores.items()))

    def client_states(self) -> dict[int, StateDict]:
        """Nothing: each node keeps its own private tensors on its own disk."""
        return {}

    def restore_client_states(self, states: dict[int, StateDict]) -> None:
        """Nothing to restore here: nodes reload their private tensors by round."""

    def _exchange(
        self,
        kind: str,
        round_idx: int,
        payloads: dict[int, ClientPayload],
        decode: Callable[[RecordDict], Reply],
    ) -> dict[int, Reply]:
        """Send each online addressed client its payload; the replies that came in time, by
        client id (aggregation sums in that order, as in-process)."""
        self.roster.refresh(self.grid)
        nodes = self.roster.online(self.grid)
        timeout = self.settings.reply_timeout
        run = RunInfo(self.cfg, self.method, self.run_dir.run_id)
        reachable = sorted(c for c in payloads if c in nodes)
        log.info("round %d: sending clients %s their %s messages", round_idx, reachable, kind)
        requests = {
            c: Message(
                payload_to_record(payloads[c], run),
                dst_node_id=nodes[c],
                message_type=kind,
                group_id=str(round_idx),
                ttl=timeout,
            )
            for c in reachable
        }
        replies: dict[int, Reply] = {}
        failures = {c: "no SuperNode online" for c in payloads}
        failures |= {c: f"no reply from node {nodes[c]} within {timeout:g} s" for c in reachable}
        for c, reply in _replies_by_request(self.grid, requests, timeout):
            if reply.has_error():
                failures[c] = f"node {nodes[c]}: {reply.error.reason}"
                continue
            try:
                replies[c] = decode(reply.content)
            except (KeyError, TypeError, ValueError) as err:  # e.g. another fedamole version
                failures[c] = f"node {nodes[c]}: unreadable reply ({err!r})"
        for c in sorted(set(failures) - set(replies)):
            log.warning(
                "round %d: client %d dropped from this round's %s (%s); experts only it held keep "
                "their weights, its last embeddings are reused",
                round_idx,
                c,
                kind,
                failures[c],
            )
        return dict(sorted(replies.items()))


def run_federation(grid: Grid, settings: FlowerSettings) -> dict[str, Any]:
    """The engine over Flower; returns the summary written to summary.json. Settings and the run
    directory are checked before anything expensive."""
    setup = open_run(settings.config, settings.method, settings.resume, with_data=False)
    cfg, method, run_dir = setup.cfg, setup.method, setup.run_dir
    transport = FlowerTransport(grid, settings, cfg, method.name, run_dir)
    engine = Engine(cfg, method, transport, run_dir, Console(width=120))

    def initial_state(participants: list[int]) -> ServerState:
        handle, _ = method.build(cfg)  # the server needs the model only to initialise round 0
        return method.init_state(cfg, handle, participants)

    return engine.run(initial_state, settings.resume)
