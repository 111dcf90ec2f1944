"""One set-up for every transport: the checks that can fail, in the order that fails fastest, then
the run directory, then (where the clients live in this process) the model and the clients.

The in-process runner, the Flower ServerApp, a Flower node and ``compare`` all start here, so a
new transport adds no copy of these steps. Every check that can fail (method, settings, device,
data) runs before the model loads; the run directory opens only once the settings are known good.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedamole.config import Config, ConfigError
from fedamole.data.pipeline import TaskSplits, encode_client, prepare_client_splits
from fedamole.data.prompts import build_prompter
from fedamole.device import resolve_device
from fedamole.federation.method import ClientRuntime, FederatedMethod, ModelHandle
from fedamole.hmole.adapter import resolve_targets
from fedamole.methods import resolve_method
from fedamole.models import check_model_name, model_skeleton
from fedamole.quantization import check_quantization
from fedamole.reporting import RunDir


def checked(
    cfg: Config, method: FederatedMethod | str | None = None
) -> tuple[Config, FederatedMethod]:
    """The method (None: FedAMoLE as ``rsea.mode`` says) and the config as it runs it, with the
    device and the method's settings checked."""
    method = method if isinstance(method, FederatedMethod) else resolve_method(method, cfg)
    cfg = method.configure(cfg)
    resolve_device(cfg.model.device)
    check_model_name(cfg.model.name)
    check_quantization(cfg.model.quantization)
    check_target_modules(cfg)
    method.check(cfg)
    return cfg, method


def check_target_modules(cfg: Config) -> None:
    """``hmole.target_modules`` against the model's own module names, from its config alone
    (no weights), so a name that matches nothing is an error before data or weights load."""
    skeleton = model_skeleton(cfg.model.name)
    if skeleton is not None:
        try:
            resolve_targets(skeleton, cfg.hmole.target_modules)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class RunSetup:
    """A checked run with its directory open; ``splits`` are every client's data when the
    clients live in this process (None on a server that never sees client data)."""

    cfg: Config
    method: FederatedMethod
    run_dir: RunDir
    splits: list[TaskSplits] | None


def open_run(
    cfg: Config, method: FederatedMethod | str | None, resume: bool, *, with_data: bool
) -> RunSetup:
    """Check everything, load the clients' data if they live here, then open ``output.dir``."""
    cfg, method = checked(cfg, method)
    splits = prepare_client_splits(cfg) if with_data else None
    return RunSetup(cfg, method, RunDir.open(cfg, method.name, resume), splits)


def client_runtime(
    method: FederatedMethod,
    handle: ModelHandle,
    tokenizer: PreTrainedTokenizerBase,
    cfg: Config,
    client_id: int,
    splits: TaskSplits,
) -> ClientRuntime:
    """One client on a built model: its data in the run's prompt format, its initial state."""
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    data = encode_client(client_id, splits, prompter, cfg.model.max_length)
    return method.runtime(handle, tokenizer, cfg, data)


def build_clients(setup: RunSetup) -> tuple[ModelHandle, list[ClientRuntime]]:
    """The method's model, built once, and every client of this process on it."""
    if setup.splits is None:
        raise ValueError("build_clients needs a run set up with_data=True")
    handle, tokenizer = setup.method.build(setup.cfg)
    clients = [
        client_runtime(setup.method, handle, tokenizer, setup.cfg, c, splits)
        for c, splits in enumerate(setup.splits)
    ]
    return handle, clients
