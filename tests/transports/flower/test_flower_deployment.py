"""FedAMoLE on a real Flower deployment (SuperLink + SuperNodes on 127.0.0.1, `flwr run`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from same_run import assert_same_run, records_of, wait_for

from fedamole.config import load_config
from fedamole.hmole.keys import state_keys
from fedamole.transports.in_process import run_in_process

pytestmark = pytest.mark.e2e  # starts real processes (see pyproject markers)


def test_flower_run_resumed_after_a_server_crash_equals_the_in_process_run(
    deployment, tiny_yaml, tmp_path
):
    """FedAMoLE for 2 rounds; the ServerApp is killed once round 0's checkpoint is written and
    the run is resumed from it (resume=true): the outcome is the uninterrupted in-process run's.
    (Evaluate messages, which FedIT adds, cross the same apps in the Simulation Engine's test;
    here each message costs a fresh ClientApp process.)"""
    deployment.start_superlink()
    for client in range(3):
        deployment.start_supernode(client, 3)
    out = tmp_path / "flower-run"
    run_config = {
        "config-file": str(tiny_yaml),
        "self-declared-partitions": True,
        "output.dir": str(out),
        "reply-timeout": 240.0,
    }
    deployment.start_run(run_config)
    wait_for(lambda: (out / "checkpoint.safetensors").exists(), "round 0's checkpoint")
    deployment.kill_serverapp()
    deployment.kill("run")  # its log stream would wait for the dead ServerApp forever
    deployment.stop_run()
    assert not (out / "summary.json").exists()

    deployment.start_run(run_config | {"resume": True})
    log = deployment.finish_run(timeout=400)
    assert "resuming" in log and "at round 1" in log and "dropped" not in log

    reference = tmp_path / "in-process"
    run_in_process(load_config(tiny_yaml, [f"output.dir={reference}"]))
    assert_same_run(out, reference, rounds=2, clients=3)


def _experts_of(architecture: dict[str, list[int]]) -> list[str]:
    return [k for k in state_keys(architecture) if ".experts." in k]


def test_killed_supernode_is_dropped_then_rejoins(deployment, tiny_yaml, tmp_path):
    # One holder per expert, so the experts of the killed client are trained by nobody else.
    tiny_yaml.write_text(tiny_yaml.read_text() + "rsea: {clients_per_expert: 1}\n")
    deployment.start_superlink()
    nodes = [deployment.start_supernode(client, 2) for client in range(2)]
    out = tmp_path / "flower-run"
    deployment.start_run(
        {
            "config-file": str(tiny_yaml),
            "self-declared-partitions": True,  # insecure local try-out: no roster
            "output.dir": str(out),
            "federation.num_clients": 2,
            "federation.rounds": 3,
            "reply-timeout": 60.0,
        }
    )
    run_log = deployment.logs / "run.log"
    wait_for(lambda: "round 1: sending clients [0, 1]" in run_log.read_text(), "round 1")
    after_round_0 = load_file(str(out / "checkpoint.safetensors"))
    deployment.kill(nodes[1])  # SIGKILL, with its ClientApp: a crash mid-round
    deployment.start_supernode(1, 2)  # the organisation restarts it; it rejoins as client 1
    wait_for(lambda: (out / "assignments" / "round_002.json").exists(), "round 2")
    after_round_1 = load_file(str(out / "checkpoint.safetensors"))
    log = deployment.finish_run(timeout=300)

    assert "round 1: client 1 dropped from this round's train (" in log
    assert log.count("is client 1") == 2  # the restarted SuperNode was recognised as client 1
    rounds_of = {c: {r["round"] for r in records_of(out) if r.get("client") == c} for c in range(2)}
    assert rounds_of == {0: {0, 1, 2}, 1: {0, 2}}
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3
    held = json.loads((out / "assignments" / "round_001.json").read_text())["clients"]
    for key in _experts_of(held["1"]):
        assert torch.equal(after_round_1[f"store/{key}"], after_round_0[f"store/{key}"]), key
    for key in _experts_of(held["0"]):
        if key.endswith("lora_B"):  # trained by client 0, so they moved
            assert not torch.equal(after_round_1[f"store/{key}"], after_round_0[f"store/{key}"])
