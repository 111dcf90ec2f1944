"""A real Flower deployment on 127.0.0.1 for tests: one SuperLink, SuperNodes and the `flwr` CLI,
each in its own process group on free ports, all killed at teardown, also when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import yaml
from tiny_run import TINY_RUN

from fedamole.config import apply_overrides

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
CONNECTION = "test"
TINY_YAML = yaml.safe_dump(  # the tiny run of tests/transports/test_in_process.py
    apply_overrides({}, [*TINY_RUN, "federation.num_clients=3", "federation.rounds=2"])
)


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it), so parallel runs do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """Processes of one test federation; ``stop`` ends every process group it started."""

    connection = CONNECTION  # the `flwr` CLI's name for this deployment's SuperLink

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "flwr-home"  # FLWR_HOME: the CLI's connections, installed apps
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.home.mkdir()
        # The app folder `flwr run` bundles: this project's pyproject.toml is all the FAB needs,
        # the code being the installed fedamole. (Bundling the repo itself works too, but walks
        # every file under it, .venv included: ~10 s per run.)
        self.app = root / "app"
        self.app.mkdir()
        shutil.copy(REPO / "pyproject.toml", self.app)
        self.port = free_port()  # the SuperLink's: every API (loopback only)
        self.gateway_port: int | None = None  # the Fleet gateway's: what SuperNodes reach
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_files: list[IO[str]] = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # the tests' config files lie beside the deployment folder, outside the app
            "FEDAMOLE_FLOWER_CONFIG_DIR": str(root.parent),
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the gateway when there is one, else the SuperLink."""
        return f"127.0.0.1:{self.gateway_port or self.port}"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        self._log_files.append(log)
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def start_superlink(self, certs: Path | None = None, auth: bool = False) -> None:
        tls = (
            ["--ssl-ca-certfile", f"{certs}/ca.crt", "--ssl-certfile", f"{certs}/server.pem"]
            + ["--ssl-keyfile", f"{certs}/server.key"]
            if certs
            else ["--insecure"]
        )
        self._start(
            "superlink",
            [f"{BIN}/flower-superlink", *tls, "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--disable-runtime-dependency-installation"]
            + (["--enable-supernode-auth"] if auth else []),
        )
        self.write_connection(certs)
        self.wait_for_log("superlink", "Uvicorn running on")

    def start_gateway(self, certs: Path) -> None:
        """The README's `fedamole fleet-gateway` in front of the SuperLink, with its TLS."""
        self.gateway_port = free_port()
        self._start(
            "gateway",
            [f"{BIN}/fedamole", "fleet-gateway", "--superlink", self.address]
            + ["--host", "127.0.0.1", "--port", str(self.gateway_port)]
            + ["--ssl-certfile", f"{certs}/server.pem", "--ssl-keyfile", f"{certs}/server.key"]
            + ["--superlink-ca", f"{certs}/ca.crt"],
        )
        deadline = time.monotonic() + 30
        while not _accepts(self.gateway_port):
            assert self.processes["gateway"].poll() is None, self.tail("gateway")
            assert time.monotonic() < deadline, self.tail("gateway")
            time.sleep(0.2)
        self.write_connection(certs)

    def write_connection(self, certs: Path | None) -> None:
        """The `flwr` CLI's connections (flwr 1.41 keeps them in FLWR_HOME): the operator's to
        the SuperLink, and `outside`, to the address SuperNodes use, as an outsider holding the
        public CA certificate would write it."""
        trust = f'root-certificates = "{certs}/ca.crt"' if certs else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{trust}\n\n'
            f'[superlink.outside]\naddress = "{self.fleet_address}"\n{trust}\n'
        )

    def start_supernode(
        self, partition: int, partitions: int, certs: Path | None = None, key: Path | None = None
    ) -> str:
        """A SuperNode for client ``partition``; returns its process name (new for a restart)."""
        starts = sum(n.startswith(f"supernode-{partition}-") for n in self.processes)
        name = f"supernode-{partition}-{starts}"
        tls = ["--root-certificates", f"{certs}/ca.crt"] if certs else ["--insecure"]
        self._start(
            name,
            [f"{BIN}/flower-supernode", *tls, "--superlink", self.fleet_address]
            + ["--port", str(free_port()), "--max-wait-time", "60"]
            + (["--auth-supernode-private-key", str(key)] if key else [])
            + ["--node-config", f"partition-id={partition} num-partitions={partitions}"],
        )
        return name

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this deployment's connection; output captured."""
        return subprocess.run(
            [f"{BIN}/flwr", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_run(self, run_config: dict[str, object], name: str = "run") -> str:
        """Submit the FedAMoLE app (`flwr run <app> test --stream -c ...`) in the background."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        self._start(
            name, [f"{BIN}/flwr", "run", str(self.app), CONNECTION, "--stream", "-c", overrides]
        )
        return name

    def register(self, public_key: Path, connection: str = CONNECTION) -> int:
        """`flwr supernode register`: the node id the SuperLink gave the key."""
        done = self.flwr("supernode", "register", str(public_key), connection)
        assert done.returncode == 0, done.stdout + done.stderr
        ids = re.findall(r"\b\d{6,}\b", done.stdout)
        assert len(ids) == 1, done.stdout
        return int(ids[0])

    def finish_run(self, timeout: float) -> str:
        """Wait for the submitted run's log stream to end; return what it printed."""
        proc = self.processes["run"]
        proc.wait(timeout=timeout)
        log = (self.logs / "run.log").read_text()
        assert proc.returncode == 0, log
        return log

    def wait_for_log(self, name: str, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in (self.logs / f"{name}.log").read_text():
            assert self.processes[name].poll() is None, self.tail(name)
            assert time.monotonic() < deadline, (
                f"{name}: no {text!r} in {timeout} s\n{self.tail(name)}"
            )
            time.sleep(0.2)

    def wait_until_online(self, count: int, timeout: float = 60) -> None:
        """Until the SuperLink lists ``count`` online SuperNodes."""
        deadline = time.monotonic() + timeout
        while True:
            listed = self.flwr("supernode", "list", CONNECTION, "--format", "json")
            nodes = json.loads(listed.stdout).get("nodes", []) if listed.returncode == 0 else []
            if sum(n.get("status") == "online" for n in nodes) >= count:
                return
            assert time.monotonic() < deadline, f"{count} SuperNodes not online: {listed.stdout}"
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """SIGKILL a process with its whole group (SuperExec, ClientApp children): a crash."""
        proc = self.processes[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_run(self, name: str = "run") -> None:
        """`flwr stop` the run the log ``name`` started: what an operator does after its
        ServerApp crashed, so that SuperNodes stop waiting on the dead run's messages (Flower
        otherwise marks it finished only when its heartbeat expires, about a minute later)."""
        run_id = re.search(
            r"Successfully started run (\d+)", (self.logs / f"{name}.log").read_text()
        )
        assert run_id, self.tail(name)
        done = self.flwr("stop", run_id.group(1), CONNECTION)
        assert done.returncode == 0, done.stdout + done.stderr

    def kill_serverapp(self) -> None:
        """SIGKILL the run's ServerApp process (a child of the SuperLink): the server crashes
        mid-run while the SuperLink and the SuperNodes stay up."""
        for pid in _descendants(self.processes["superlink"].pid):
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                return
        raise AssertionError("no flwr-serverapp process under the SuperLink")

    def tail(self, name: str, lines: int = 40) -> str:
        text = (self.logs / f"{name}.log").read_text().splitlines()
        return f"--- {name} ---\n" + "\n".join(text[-lines:])

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.processes.values():  # children that outlived their leader
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for log in self._log_files:
            log.close()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, p in parents.items() if p == parent]
        found += children
        todo += children
    return found


@pytest.fixture
def deployment(tmp_path, request) -> Iterator[Deployment]:
    dep = Deployment(tmp_path / "deployment")
    try:
        yield dep
    finally:
        dep.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print("\n".join(dep.tail(name) for name in dep.processes))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report to fixtures, so a failing test prints the process logs."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def certs(tmp_path) -> Path:
    """Test CA, SuperLink certificate and 4 SuperNode key pairs from the README's script."""
    out = tmp_path / "certificates"
    script = REPO / "scripts" / "make_test_certs.py"
    subprocess.run([sys.executable, str(script), str(out), "--nodes", "4"], check=True)
    return out


@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path
