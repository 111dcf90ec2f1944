"""The serving tests' one fixture of trained runs: a finished one-round tiny run per method (four
clients for the methods the server tests serve), trained the first time a test of this session
asks for it and shared by every serving test after that (nothing here writes into them: tests
that change a run change a copy)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from serving_cases import CLIENTS, MAX_TOKENS, PROMPTS, SERVED_METHODS, SERVED_RUN

from fedamole.config import load_config
from fedamole.reporting import ADAPTER_WEIGHTS, RunDir
from fedamole.serving import load_client_model
from fedamole.transports.in_process import run_in_process


class Runs:
    """Finished runs by method name, each trained on first use."""

    def __init__(self, root: Path) -> None:
        self.root, self.trained = root, set()

    def __getitem__(self, method: str) -> Path:
        out = self.root / method
        if method not in self.trained:
            clients = CLIENTS if method in SERVED_METHODS else 2
            settings = [*SERVED_RUN, f"federation.num_clients={clients}", f"output.dir={out}"]
            run_in_process(load_config(None, settings), method=method)
            self.trained.add(method)
        return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"))


def _make_distinct(weights: Path, seed: int) -> None:
    """Two tiny training steps leave the clients' models alike; random saved weights make each
    client answer differently, so an answer from the wrong client's adapter is caught."""
    gen = torch.Generator().manual_seed(seed)
    state = load_file(str(weights))
    save_file(
        {k: v + torch.randn(v.shape, generator=gen) * 0.5 for k, v in state.items()}, str(weights)
    )


@pytest.fixture(scope="session")
def served(runs, tmp_path_factory) -> dict[str, Path]:
    """Copies of the FedAMoLE and FedIT runs whose clients answer visibly differently."""
    root = tmp_path_factory.mktemp("served")
    out = {}
    for method in ("fedamole", "fedit"):
        out[method] = Path(shutil.copytree(runs[method], root / method))
        for client in range(CLIENTS):
            _make_distinct(RunDir(out[method]).client_folder(client) / ADAPTER_WEIGHTS, client)
    return out


@pytest.fixture(scope="session")
def generated(served) -> dict[tuple[str, int, str], str]:
    """`fedamole generate`'s greedy answer per method, client and prompt (one prompt at a time),
    from the served copies: what every server path must answer."""
    out = {}
    for method, run in served.items():
        for client in range(CLIENTS):
            model = load_client_model(run, client)
            for prompt in PROMPTS:
                out[method, client, prompt] = model.generate(prompt, max_new_tokens=MAX_TOKENS)[0]
    return out
