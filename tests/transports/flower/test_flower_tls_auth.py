"""The README's secure set-up, attacked: TLS with the script's test CA, SuperNode authentication
with registered keys, the SuperLink on loopback behind `fedamole fleet-gateway`, and the
operator's roster. The outsider holds only the public ca.crt and reaches only the address
SuperNodes use; a registered organisation tries to take another's client."""

from __future__ import annotations

import json
import time

import pytest
from same_run import records_of

pytestmark = pytest.mark.e2e  # starts real processes (see pyproject markers)

SECRET = "sk-hospital-a-0123456789abcdef"


def _node_log_mentions_work(deployment, name: str) -> bool:
    """Whether a SuperNode pulled any message (it logs each one it receives)."""
    return "Receiving: " in (deployment.logs / f"{name}.log").read_text()


def _wait_for_exit(deployment, name: str, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while deployment.processes[name].poll() is None:
        assert time.monotonic() < deadline, deployment.tail(name)
        time.sleep(0.2)
    return deployment.processes[name].returncode


def test_only_the_rosters_organisations_take_part_each_as_itself(
    deployment, certs, tiny_yaml, tmp_path, tmp_path_factory
):
    """node-0 and node-1 are the roster's clients 0 and 1. node-2 is registered (an organisation
    of the federation, say) but not on this run's roster, and claims client 1. node-3 was never
    registered. An outsider uses the `flwr` CLI against the public address."""
    deployment.start_superlink(certs, auth=True)
    deployment.start_gateway(certs)
    ids = [deployment.register(certs / f"node-{i}.pub") for i in range(3)]
    (deployment.app / "roster.yaml").write_text(f"{ids[0]}: 0\n{ids[1]}: 1\n")

    nodes = [deployment.start_supernode(c, 2, certs=certs, key=certs / f"node-{c}") for c in (0, 1)]
    intruder = deployment.start_supernode(1, 2, certs=certs, key=certs / "node-2")
    stranger = deployment.start_supernode(0, 2, certs=certs, key=certs / "node-3")
    assert _wait_for_exit(deployment, stranger) != 0
    assert "Failed to activate SuperNode" in deployment.tail(stranger)

    # Through the address SuperNodes use, the Control API does not exist.
    for command in (
        ("supernode", "register", str(certs / "node-3.pub"), "outside"),
        ("supernode", "list", "outside"),
        ("ls", "outside"),
        ("run", str(deployment.app), "outside", "-c", 'output.dir="/tmp/outsider"'),
    ):
        done = deployment.flwr(*command)
        assert done.returncode != 0, (command, done.stdout, done.stderr)

    # A config file outside the app (here: a serve key file of the SuperLink's machine) is
    # refused before it is read: the key appears in no log.
    secret = tmp_path_factory.mktemp("superlink-secrets") / "api_keys.yaml"
    secret.write_text(f'"{SECRET}": ["*"]\n')
    refused = deployment.start_run(
        {"config-file": str(secret), "self-declared-partitions": True}, name="refused-run"
    )
    _wait_for_exit(deployment, refused)
    assert "is outside the app folder" in (deployment.logs / "refused-run.log").read_text()

    deployment.wait_until_online(3)
    listed = deployment.flwr("supernode", "list", deployment.connection, "--format", "json")
    assert len(json.loads(listed.stdout)["nodes"]) == 3  # node-3 never got registered
    out = tmp_path / "flower-run"
    deployment.start_run(
        {
            "config-file": str(tiny_yaml),
            "roster-file": "roster.yaml",
            "output.dir": str(out),
            "federation.num_clients": 2,
            "federation.rounds": 1,
            "reply-timeout": 240.0,
        }
    )
    log = deployment.finish_run(timeout=400)

    assert f"node {ids[2]} is not on the roster (roster-file): it gets no work" in log
    assert f"node {ids[0]} is client 0" in log and f"node {ids[1]} is client 1" in log
    assert "dropped" not in log and "newer claim wins" not in log
    assert not _node_log_mentions_work(deployment, intruder)
    assert all(_node_log_mentions_work(deployment, node) for node in nodes)
    assert {r["client"] for r in records_of(out) if "client" in r} == {0, 1}
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
    for name in deployment.processes:
        assert SECRET not in (deployment.logs / f"{name}.log").read_text(), name
