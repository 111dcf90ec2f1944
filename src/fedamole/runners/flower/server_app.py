"""The FedAMoLE ServerApp: the in-process runner's round loop, with Flower's Message API as the
transport between the server and the organisations' SuperNodes.

Each round the server sends every client its own payload (its experts, the shared experts and
routers), waits at most ``reply-timeout`` seconds for the replies, and aggregates and re-assigns
with whoever answered (:func:`complete_round` keeps the experts nobody trained and reuses the
last embeddings of absent clients). A dropped client rejoins by coming back online: the server
asks new SuperNodes for their ``partition-id`` and sends them their experts from then on. The run
directory gets the same files as an in-process run (metrics.jsonl with bytes per client and
round, assignments/, checkpoint, clients/, summary.json, plots/).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.config import get_project_dir
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedamole.baselines.method import FedAMoLE, save_fedamole_adapter
from fedamole.checkpoint import atomic_write_text, save_checkpoint
from fedamole.config import Config
from fedamole.federation.server import (
    ServerState,
    check_assignment_settings,
    client_payload,
    complete_round,
    init_server_state,
)
from fedamole.federation.types import ClientPayload, ClientUpdate, payload_nbytes, update_nbytes
from fedamole.personalised import CONFIG_FILE, build_hmole_model
from fedamole.reporting import (
    metric_records,
    plot_run,
    summarise,
    write_assignment,
    write_metrics,
    write_summary,
)
from fedamole.runners.flower.records import (
    identity_from_record,
    payload_to_record,
    update_from_record,
    with_config,
)
from fedamole.runners.flower.settings import FlowerSettings, load_settings
from fedamole.runners.simulation import METHOD_FILE, check_run_dir, round_table, summary_table

log = logging.getLogger("fedamole.flower")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the run's config; ``config-file`` is relative to the app."""
    _log_to_run_stream()
    run = grid.run
    settings = load_settings(
        context.run_config, get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    )
    run_federation(grid, settings)


def _log_to_run_stream() -> None:
    """Flower forwards the ServerApp's stdout to ``flwr run --stream`` / ``flwr log``."""
    logger = logging.getLogger("fedamole")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


IDENTIFY_TIMEOUT = 60.0  # s; answering "which client are you" needs no model, only a process


@dataclass
class Roster:
    """Which SuperNode is which client. Flower picks node ids; operators pick partition ids, so
    the server asks each node it has not met yet. The latest node to claim a client wins, which
    is how a restarted SuperNode takes its client back."""

    num_clients: int
    # node id -> client id, in the order nodes were identified; None: a node not of this run
    clients: dict[int, int | None] = field(default_factory=dict)

    def refresh(self, grid: Grid) -> None:
        """Ask every online node not met yet which client it is; silent ones are asked again
        at the next refresh."""
        new = [node for node in grid.get_node_ids() if node not in self.clients]
        if not new:
            return
        queries = {
            node: Message(
                RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, ttl=IDENTIFY_TIMEOUT
            )
            for node in new
        }
        replies = dict(_replies_by_request(grid, queries, IDENTIFY_TIMEOUT))
        for node in new:
            reply = replies.get(node)
            if reply is None or reply.has_error():
                reason = reply.error.reason if reply else f"no answer in {IDENTIFY_TIMEOUT:g} s"
                log.warning("node %d did not say which client it is (%s)", node, reason)
            else:
                self.clients[node] = self._client_of(node, *identity_from_record(reply.content))

    def _client_of(self, node: int, client: int, num_partitions: int) -> int | None:
        if num_partitions == self.num_clients and 0 <= client < num_partitions:
            log.info("node %d is client %d", node, client)
            return client
        log.error(
            "node %d has partition-id=%d num-partitions=%d, but this run has "
            "federation.num_clients=%d; the node is ignored",
            node,
            client,
            num_partitions,
            self.num_clients,
        )
        return None

    def online(self, grid: Grid) -> dict[int, int]:
        """client id -> node id for the clients whose node is online (latest claim wins)."""
        online = set(grid.get_node_ids())
        return {c: node for node, c in self.clients.items() if c is not None and node in online}

    def wait_for_all(self, grid: Grid, join_timeout: float) -> None:
        """Give every organisation up to ``join_timeout`` s to connect before round 0."""
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


def train_round(
    grid: Grid, cfg: Config, state: ServerState, nodes: dict[int, int], timeout: float
) -> list[tuple[ClientPayload, ClientUpdate]]:
    """Send each online client its own payload; return (payload, update) of those that replied
    in time, by client id (aggregation sums in that order, as the in-process runner does)."""
    payloads = {c: client_payload(state, c) for c in sorted(nodes)}
    log.info("round %d: sending clients %s their experts", state.round, sorted(payloads))
    requests = {
        c: Message(
            with_config(payload_to_record(payload), cfg),
            dst_node_id=nodes[c],
            message_type=MessageType.TRAIN,
            group_id=str(state.round),
            ttl=timeout,
        )
        for c, payload in payloads.items()
    }
    updates: dict[int, ClientUpdate] = {}
    failures = {c: "no SuperNode online" for c in range(len(state.architectures))}
    failures |= {c: f"no reply from node {node} within {timeout:g} s" for c, node in nodes.items()}
    for c, reply in _replies_by_request(grid, requests, timeout):
        if reply.has_error():
            failures[c] = f"node {nodes[c]}: {reply.error.reason}"
            continue
        try:
            updates[c] = update_from_record(reply.content)
        except (KeyError, TypeError, ValueError) as err:  # e.g. another fedamole version
            failures[c] = f"node {nodes[c]}: unreadable reply ({err!r})"
    for c in sorted(set(failures) - set(updates)):
        log.warning(
            "round %d: client %d dropped from this round (%s); experts only it held keep their "
            "weights, its last embeddings are reused",
            state.round,
            c,
            failures[c],
        )
    return [(payloads[c], updates[c]) for c in sorted(updates)]


def run_federation(grid: Grid, settings: FlowerSettings) -> dict[str, Any]:
    """Every round: assign, send, collect, aggregate, re-assign, and write the outputs the
    in-process runner writes; returns the summary written to summary.json."""
    cfg = settings.config
    started = time.perf_counter()
    run_dir, state = _start_run(cfg)
    roster = Roster(cfg.federation.num_clients)
    roster.wait_for_all(grid, settings.join_timeout)
    console = Console(width=120)
    records: list[dict[str, Any]] = []
    held = state.architectures
    while state.round < cfg.federation.rounds:
        write_assignment(run_dir, state.round, state.architectures)
        roster.refresh(grid)
        results = train_round(grid, cfg, state, roster.online(grid), settings.reply_timeout)
        _record_round(run_dir, cfg, state.round, results, records)
        held = state.architectures
        state = complete_round(cfg, state, [update for _, update in results])
        write_metrics(run_dir, records)
        save_checkpoint(run_dir, state, {"wall_time_s": time.perf_counter() - started})
        if results:
            console.print(round_table(state.round - 1, [update for _, update in results]))
    summary = {
        "method": FedAMoLE.for_config(cfg).name,
        **summarise(records, time.perf_counter() - started),
    }
    write_summary(run_dir, summary)
    plot_run(run_dir, records, held)
    console.print(summary_table(summary))
    log.info("outputs in %s", run_dir)
    return summary


def _start_run(cfg: Config) -> tuple[Path, ServerState]:
    """Check the settings and the run directory before anything expensive, then round 0's
    state, initialised from the seed exactly as the in-process runner does."""
    check_assignment_settings(cfg)
    run_dir = check_run_dir(cfg, resume=False)
    adapter, _ = build_hmole_model(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
    atomic_write_text(run_dir / METHOD_FILE, json.dumps({"method": FedAMoLE.for_config(cfg).name}))
    state = init_server_state(
        cfg, adapter.modules, adapter.init_global_state(cfg.hmole.num_experts, cfg.seed)
    )
    return run_dir, state


def _record_round(
    run_dir: Path,
    cfg: Config,
    round_idx: int,
    results: list[tuple[ClientPayload, ClientUpdate]],
    records: list[dict[str, Any]],
) -> None:
    """Metrics and bytes per client, as the in-process runner records them; the last round also
    saves each client's personalised adapter."""
    for payload, update in results:
        records += metric_records(
            round_idx,
            update.client_id,
            update.metrics,
            update_nbytes(update),
            payload_nbytes(payload),
        )
        if round_idx == cfg.federation.rounds - 1:
            save_fedamole_adapter(run_dir, payload, update, cfg)
