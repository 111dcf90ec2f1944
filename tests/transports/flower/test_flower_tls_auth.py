"""The README's secure set-up, attacked as an outsider: TLS with the script's test CA, SuperNode
authentication with registered keys, the SuperLink on loopback behind `fedamole fleet-gateway`,
and the operator's roster. The outsider holds only the public ca.crt and reaches only the
address SuperNodes use."""

from __future__ import annotations

import json
import time

from same_run import records_of


def _node_log_mentions_work(deployment, name: str) -> bool:
    """Whether a SuperNode ran a ClientApp for any message (it logs each one it pulls)."""
    return "Receiving: " in (deployment.logs / f"{name}.log").read_text()


def test_unregistered_nodes_and_outsiders_are_turned_away(deployment, certs):
    deployment.start_superlink(certs, auth=True)
    deployment.start_gateway(certs)
    deployment.register(certs / "node-0.pub")

    accepted = deployment.start_supernode(0, 2, certs=certs, key=certs / "node-0")
    refused = deployment.start_supernode(1, 2, certs=certs, key=certs / "node-1")
    deployment.wait_until_online(1)
    deadline = time.monotonic() + 60
    while deployment.processes[refused].poll() is None:
        assert time.monotonic() < deadline, deployment.tail(refused)
        time.sleep(0.2)
    assert deployment.processes[refused].returncode != 0
    assert "Failed to activate SuperNode" in deployment.tail(refused)
    assert deployment.processes[accepted].poll() is None

    # Through the address SuperNodes use, the Control API does not exist.
    for command in (
        ("supernode", "register", str(certs / "node-1.pub"), "outside"),
        ("supernode", "list", "outside"),
        ("ls", "outside"),
        ("run", str(deployment.app), "outside", "-c", 'output.dir="/tmp/outsider"'),
    ):
        done = deployment.flwr(*command)
        assert done.returncode != 0, (command, done.stdout, done.stderr)
    listed = deployment.flwr("supernode", "list", deployment.connection, "--format", "json")
    nodes = json.loads(listed.stdout)["nodes"]
    assert [n["status"] for n in nodes] == ["online"], nodes  # node-1 never got registered
    assert deployment.flwr("ls", deployment.connection).returncode == 0  # no run was submitted


def test_a_registered_node_cannot_take_another_organisations_client(
    deployment, certs, tiny_yaml, tmp_path
):
    """node-2 is registered (an organisation of the federation, say) but not on this run's
    roster, and claims client 1 while node-1 is client 1: it gets no message, node-1 keeps its
    client, and the run has exactly the roster's two contributors."""
    deployment.start_superlink(certs, auth=True)
    deployment.start_gateway(certs)
    ids = [deployment.register(certs / f"node-{i}.pub") for i in range(3)]
    (deployment.app / "roster.yaml").write_text(f"{ids[0]}: 0\n{ids[1]}: 1\n")

    nodes = [deployment.start_supernode(c, 2, certs=certs, key=certs / f"node-{c}") for c in (0, 1)]
    intruder = deployment.start_supernode(1, 2, certs=certs, key=certs / "node-2")
    deployment.wait_until_online(3)
    out = tmp_path / "flower-run"
    deployment.start_run(
        {
            "config-file": str(tiny_yaml),
            "roster-file": "roster.yaml",
            "output.dir": str(out),
            "federation.num_clients": 2,
            "reply-timeout": 240.0,
        }
    )
    log = deployment.finish_run(timeout=400)

    assert f"node {ids[2]} is not on the roster (roster-file): it gets no work" in log
    assert f"node {ids[0]} is client 0" in log and f"node {ids[1]} is client 1" in log
    assert "dropped" not in log and "newer claim wins" not in log
    assert not _node_log_mentions_work(deployment, intruder)
    assert all(_node_log_mentions_work(deployment, node) for node in nodes)
    clients = {r["client"] for r in records_of(out) if "client" in r}
    assert clients == {0, 1}
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


SECRET = "sk-hospital-a-0123456789abcdef"


def test_a_config_file_outside_the_app_is_refused_unread(
    deployment, certs, tmp_path_factory, tiny_yaml
):
    """The operator's own run naming a file of the SuperLink's machine (here: a serve key file)
    as its config fails before reading it: the key appears in no log."""
    secret = tmp_path_factory.mktemp("superlink-secrets") / "api_keys.yaml"
    secret.write_text(f'"{SECRET}": ["*"]\n')
    deployment.start_superlink(certs, auth=True)
    deployment.start_gateway(certs)
    run = deployment.start_run({"config-file": str(secret), "self-declared-partitions": True})
    deployment.processes[run].wait(timeout=120)
    shown = (deployment.logs / "run.log").read_text()
    assert "is outside the app folder" in shown, shown
    for name in deployment.processes:
        assert SECRET not in (deployment.logs / f"{name}.log").read_text(), name
