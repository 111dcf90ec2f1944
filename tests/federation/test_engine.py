"""The round engine alone, over a scripted transport: the clients are real (tiny model, real
method jobs), the transport decides who answers, so drop-outs and a kill mid-run are exact."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console
from tiny_run import TINY_RUN

from fedamole.config import load_config
from fedamole.federation.client import evaluate_job, train_job
from fedamole.federation.engine import Engine
from fedamole.federation.method import ClientRuntime, FederatedMethod
from fedamole.reporting import RunDir
from fedamole.transports.setup import build_clients, open_run
from fedamole.types import ClientEvaluation, ClientPayload, ClientUpdate, StateDict

TINY = [*TINY_RUN, "model.device=cpu", "federation.num_clients=3", "federation.rounds=2"]


class Killed(RuntimeError):
    """The process 'dies' in the middle of a round."""


@dataclass
class ScriptedTransport:
    """In-process clients; ``silent[(kind, round)]`` are the clients that do not answer."""

    method: FederatedMethod
    clients: dict[int, ClientRuntime]
    silent: dict[tuple[str, int], set[int]] = field(default_factory=dict)
    kill_at: tuple[str, int] | None = None
    sent: list[tuple[str, int, list[int]]] = field(default_factory=list)
    # (kind, round) -> client -> (what was sent, what came back): the traffic itself
    traffic: dict[tuple[str, int], dict[int, tuple]] = field(default_factory=dict)

    def connect(self) -> None:
        self.sent.append(("connect", -1, []))

    def _answering(self, kind: str, round_idx: int, payloads: dict[int, ClientPayload]):
        self.sent.append((kind, round_idx, sorted(payloads)))
        if self.kill_at == (kind, round_idx):
            raise Killed(f"killed in the {kind} step of round {round_idx}")
        silent = self.silent.get((kind, round_idx), set())
        return {c: p for c, p in payloads.items() if c not in silent}

    def train(self, round_idx: int, payloads: dict[int, ClientPayload]) -> dict[int, ClientUpdate]:
        answering = self._answering("train", round_idx, payloads)
        replies = {c: train_job(self.method, p, self.clients[c]) for c, p in answering.items()}
        self.traffic[("train", round_idx)] = {c: (p, replies.get(c)) for c, p in payloads.items()}
        return replies

    def evaluate(
        self, round_idx: int, payloads: dict[int, ClientPayload]
    ) -> dict[int, ClientEvaluation]:
        answering = self._answering("evaluate", round_idx, payloads)
        replies = {c: evaluate_job(self.method, p, self.clients[c]) for c, p in answering.items()}
        self.traffic[("evaluate", round_idx)] = {c: (p, None) for c, p in payloads.items()}
        return replies

    def client_states(self) -> dict[int, StateDict]:
        return {c: runtime.private for c, runtime in self.clients.items()}

    def base_scores(self) -> dict[int, dict[str, float]]:
        return {}

    def restore_client_states(self, states: dict[int, StateDict]) -> None:
        for c, state in states.items():
            self.clients[c].private = state


def run(
    out: Path, method: str, resume: bool = False, extra: tuple[str, ...] = (), **script
) -> tuple[dict, ScriptedTransport]:
    cfg = load_config(None, [*TINY, f"output.dir={out}", *extra])
    setup = open_run(cfg, method, resume, with_data=True)
    handle, clients = build_clients(setup)
    transport = ScriptedTransport(setup.method, {r.data.client_id: r for r in clients}, **script)
    engine = Engine(setup.cfg, setup.method, transport, setup.run_dir, Console(quiet=True))
    summary = engine.run(lambda first: setup.method.init_state(setup.cfg, handle, first), resume)
    return summary, transport


def client_rounds(out: Path) -> set[tuple[int, int]]:
    return {(r["round"], r["client"]) for r in RunDir(out).read_records() if "client" in r}


def test_a_client_silent_in_training_is_left_out_of_that_round_only(tmp_path):
    summary, transport = run(tmp_path / "r", "fedit", silent={("train", 1): {2}})
    assert client_rounds(tmp_path / "r") == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    # the evaluation after aggregation goes to those that trained, and nobody else
    assert ("evaluate", 1, [0, 1]) in transport.sent
    saved = {p.name for p in (tmp_path / "r" / "clients").iterdir()}
    assert saved == {"0", "1"}  # client 2 missed the last round: no model to save
    assert summary["rounds"] == 2


def test_a_client_that_trained_but_was_not_evaluated_has_no_record(tmp_path):
    run(tmp_path / "r", "fedit", silent={("evaluate", 0): {1}})
    assert (0, 1) not in client_rounds(tmp_path / "r")
    assert (1, 1) in client_rounds(tmp_path / "r")


def test_local_evaluation_needs_no_second_message(tmp_path):
    _, transport = run(tmp_path / "r", "fedit-ft")
    assert [kind for kind, _, _ in transport.sent] == ["connect", "train", "train"]


@pytest.mark.parametrize("method", ["fedamole", "feddpa"])
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path, method):
    reference, _ = run(tmp_path / "whole", method)
    with pytest.raises(Killed):
        run(tmp_path / "killed", method, kill_at=("train", 1))
    assert RunDir(tmp_path / "killed").load_checkpoint().state.round == 1
    resumed, transport = run(tmp_path / "killed", method, resume=True)
    assert [(k, r) for k, r, _ in transport.sent if k == "train"] == [("train", 1)]
    strip = ("wall_time_s",)
    assert {k: v for k, v in resumed.items() if k not in strip} == {
        k: v for k, v in reference.items() if k not in strip
    }
    assert (
        RunDir(tmp_path / "killed").read_example_scores()
        == RunDir(tmp_path / "whole").read_example_scores()
    )


def _described(tensors: StateDict, dp_noise: bool = False, prefix: str = "") -> list[dict]:
    return [
        {
            "name": prefix + name,
            "shape": list(tensors[name].shape),
            "dtype": str(tensors[name].dtype).removeprefix("torch."),
            "bytes": tensors[name].numel() * tensors[name].element_size(),
            "dp_noise": dp_noise,
        }
        for name in sorted(tensors)
    ]


@pytest.mark.parametrize(
    ("method", "extra"),
    [("fedamole", ("privacy.enabled=true", "privacy.seed=1")), ("fedit", ())],
)
def test_each_rounds_manifest_lists_exactly_the_tensors_exchanged(tmp_path, method, extra):
    """Against the payloads and updates that crossed the transport (and the embeddings' DP
    flag); its totals are metrics.jsonl's bytes_down and bytes_up. Client 2 stays silent in
    round 1: it was sent its payload and sent nothing back."""
    out = tmp_path / "r"
    _, transport = run(out, method, extra=extra, silent={("train", 1): {2}})
    bytes_of = {(r["round"], r["client"]): r for r in RunDir(out).read_records() if "client" in r}
    for round_idx in (0, 1):
        doc = json.loads((out / "manifests" / f"round_{round_idx:03d}.json").read_text())
        assert doc["round"] == round_idx and set(doc["clients"]) == {"0", "1", "2"}
        for c, (payload, update) in transport.traffic[("train", round_idx)].items():
            entry = doc["clients"][str(c)]
            assert entry["downloaded"]["train"] == _described(payload.weights)
            evaluated = transport.traffic.get(("evaluate", round_idx), {})
            if c in evaluated:
                assert entry["downloaded"]["evaluate"] == _described(evaluated[c][0].weights)
            assert entry["answered"] == (update is not None)
            if update is None:
                assert entry["uploaded"] == {"weights": [], "embeddings": []}
                continue
            assert entry["uploaded"]["weights"] == _described(update.weights)
            embeddings = update.embeddings.to_tensors() if update.embeddings else {}
            noised = method == "fedamole"
            assert entry["uploaded"]["embeddings"] == _described(embeddings, noised, "embedding/")
            assert (entry["bytes_up"], entry["bytes_down"]) == (
                bytes_of[(round_idx, c)]["bytes_up"],
                bytes_of[(round_idx, c)]["bytes_down"],
            )
            assert entry["bytes_up"] > 0
