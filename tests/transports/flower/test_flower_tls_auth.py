"""The README's secure set-up: TLS with the script's test CA, SuperNode authentication with
registered public keys. A registered node joins; an unregistered one is turned away."""

from __future__ import annotations

import time


def test_tls_superlink_accepts_registered_supernode_and_refuses_unregistered(deployment, certs):
    deployment.start_superlink(certs, auth=True)
    registered = deployment.flwr(
        "supernode", "register", str(certs / "node-0.pub"), deployment.connection
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr

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
    listed = deployment.flwr("supernode", "list", deployment.connection)
    assert listed.stdout.count("online") == 1, listed.stdout
