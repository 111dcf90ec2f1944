"""LoRA baselines on real PEFT adapters, each a few rules on one :class:`LoraMethod`.

Every baseline injects ``peft`` LoRA with FedAMoLE's rank, alpha, dropout and target modules
(``cfg.hmole``), trains with the shared loop (same steps, batches, seeds and Adam settings) and
differs only in

- ``shared``: which adapter tensors go to the server and are averaged (per key, over the clients
  that sent it: :func:`fedamole.aggregation.aggregate`); everything else stays on the client;
- ``phases``: what local training updates, with which adapters active at which weight;
- ``evaluate_aggregated``: whether a client's model is evaluated after aggregation (the global
  model plus its private part) or right after its local training.

=========  ==============  ================  =====================
method     shared          trained           evaluated
=========  ==============  ================  =====================
local      nothing         A and B           after local training
fedit      A and B         A and B           after aggregation
fedit-ft   A and B         A and B           after local training
ffa-lora   B               B (A stays init)  after aggregation
=========  ==============  ================  =====================

FFA-LoRA's A matrices are drawn once from the run seed, identically on every client (what the
server's one-time initialisation amounts to; that one-off download is not counted), and never
change. FedDPA (:mod:`fedamole.baselines.feddpa`) adds a second, private adapter.

State travels as flat dicts keyed ``"<adapter>/<PEFT state-dict key>"``, so aggregation,
checkpoints and ``clients/<id>/adapter.safetensors`` handle it like any other state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedamole.aggregation import aggregate
from fedamole.baselines.method import FederatedMethod, primary_test_metric
from fedamole.config import Config, HMoLEConfig
from fedamole.data.example import Example
from fedamole.data.pipeline import ClientDataset
from fedamole.evaluation import SplitScores, evaluate_examples, split_metrics
from fedamole.federation.server import ServerState
from fedamole.federation.training import StepCallback, round_seed, shuffled_batches, train_steps
from fedamole.federation.types import ClientPayload, ClientUpdate, StateDict
from fedamole.models import load_base_model
from fedamole.personalised import load_run_config
from fedamole.reporting import save_client_model

KeyRule = Callable[[str], bool]
ADAPTER_FILE = "adapter.json"
DEFAULT = "default"


def every_key(key: str) -> bool:
    return True


def no_key(key: str) -> bool:
    return False


def lora_b_key(key: str) -> bool:
    return ".lora_B." in key


def adapter_key(adapter: str) -> KeyRule:
    """Keys of one named adapter (FedDPA's "global" or "local")."""
    return lambda key: key.startswith(f"{adapter}/")


def lora_config(h: HMoLEConfig) -> LoraConfig:
    """One LoRA with FedAMoLE's budget: same rank, alpha, dropout and target modules."""
    return LoraConfig(
        r=h.rank,
        lora_alpha=h.alpha,
        lora_dropout=h.dropout,
        target_modules=h.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


class LoraHandle:
    """A frozen backbone with named PEFT LoRA adapters, shared by every simulated client:
    states are swapped in and out as flat dicts."""

    def __init__(self, model: PeftModel, adapters: tuple[str, ...]) -> None:
        self.model = model
        self.adapters = adapters
        self.params = _flat_parameters(model, adapters)
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def state(self) -> StateDict:
        """Every adapter's tensors, as detached copies."""
        return {
            f"{adapter}/{key}": value.detach().clone()
            for adapter in self.adapters
            for key, value in get_peft_model_state_dict(self.model, adapter_name=adapter).items()
        }

    def load(self, state: StateDict) -> None:
        """Load a complete state (every tensor of every adapter must be there)."""
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(f"LoRA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for adapter in self.adapters:
            prefix = f"{adapter}/"
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            set_peft_model_state_dict(self.model, part, adapter_name=adapter)

    def trainable(self, rule: KeyRule) -> list[nn.Parameter]:
        """Unfreeze exactly the tensors ``rule`` selects; all other adapter tensors stay frozen."""
        for key, param in self.params.items():
            param.requires_grad_(rule(key))
        return [param for key, param in self.params.items() if rule(key)]

    @contextmanager
    def mixing(self, weights: dict[str, float]) -> Iterator[None]:
        """Run with these adapters active, each scaled by its weight times alpha / r."""
        self.model.base_model.set_adapter(list(weights))
        for layer in self.layers:
            for adapter, weight in weights.items():
                layer.set_scale(adapter, weight)
        try:
            yield
        finally:
            for layer in self.layers:
                for adapter in weights:
                    layer.set_scale(adapter, 1.0)


def _flat_parameters(model: PeftModel, adapters: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Adapter parameters under their flat state keys (PEFT names them ``...lora_A.<adapter>.
    weight``; its state dicts drop the adapter name)."""
    out: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        for adapter in adapters:
            marker = f".{adapter}."
            if ".lora_" in name and marker in name:
                out[f"{adapter}/{name.replace(marker, '.')}"] = param
    return out


@dataclass
class LoraRuntime:
    """One client: the shared handle, its data, and the adapter tensors it never uploads."""

    handle: LoraHandle
    tokenizer: PreTrainedTokenizerBase
    cfg: Config
    data: ClientDataset
    private: StateDict = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """A stretch of local training: the active adapters with their weights, and what learns."""

    weights: dict[str, float]
    trains: KeyRule


@dataclass
class LoraMethod(FederatedMethod):
    """A LoRA baseline: FedAvg over the ``shared`` tensors of PEFT adapters (see module doc)."""

    name: str
    shared: KeyRule
    phases: tuple[Phase, ...]
    evaluate_aggregated: bool
    communicates: bool = True
    adapters: tuple[str, ...] = (DEFAULT,)
    initial: StateDict = field(default_factory=dict, init=False, repr=False)

    # ----------------------------------------------------------------- rule a subclass may change
    def evaluate_split(self, runtime: LoraRuntime, examples: list[Example]) -> SplitScores:
        """The client's current model on one split, every adapter at full weight."""
        with runtime.handle.mixing({adapter: 1.0 for adapter in self.adapters}):
            return evaluate_examples(
                runtime.handle.model,
                runtime.data.prompter,
                examples,
                runtime.cfg.eval,
                runtime.cfg.model.max_length,
                classification=runtime.data.classification,
            )

    def description(self) -> dict[str, Any]:
        """How a saved client model is used at inference (for its JSON)."""
        return {"inference": "every adapter added at full weight (alpha / r)"}

    # ----------------------------------------------------------------- FederatedMethod
    def build(self, cfg: Config) -> tuple[LoraHandle, PreTrainedTokenizerBase]:
        model, tokenizer = load_base_model(cfg.model.name, cfg.model.dtype)
        torch.manual_seed(cfg.seed)  # LoRA init (A Kaiming-uniform, B = 0) from the run seed
        config = lora_config(cfg.hmole)
        peft_model = get_peft_model(model, config, adapter_name=self.adapters[0])
        for adapter in self.adapters[1:]:
            peft_model.add_adapter(adapter, config)
        handle = LoraHandle(peft_model, self.adapters)
        self.initial = handle.state()
        return handle, tokenizer

    def runtime(
        self,
        handle: LoraHandle,
        tokenizer: PreTrainedTokenizerBase,
        cfg: Config,
        data: ClientDataset,
    ) -> LoraRuntime:
        private = {k: v for k, v in self.initial.items() if not self.shared(k)}
        return LoraRuntime(handle, tokenizer, cfg, data, private)

    def init_state(self, cfg: Config, handle: LoraHandle) -> ServerState:
        store = {k: v for k, v in self.initial.items() if self.shared(k)}
        return ServerState(round=0, store=store, architectures=[], lr=cfg.optim.lr)

    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        return ClientPayload(round=state.round, architecture={}, weights=state.store, lr=state.lr)

    def client_round(
        self, payload: ClientPayload, runtime: LoraRuntime, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Download -> local training phases -> (local evaluation) -> upload the shared part."""
        runtime.handle.load({**runtime.private, **payload.weights})
        seed = round_seed(runtime.cfg.seed, payload.round, runtime.data.client_id)
        losses = [self._train(runtime, phase, payload.lr, seed, on_step) for phase in self.phases]
        trained = runtime.handle.state()
        runtime.private = {k: v for k, v in trained.items() if not self.shared(k)}
        metrics = {"train_loss": sum(losses) / len(losses)}
        if not self.evaluate_aggregated:
            metrics |= self._evaluate(runtime)
        return ClientUpdate(
            client_id=runtime.data.client_id,
            weights={k: v for k, v in trained.items() if self.shared(k)},
            num_examples=len(runtime.data.train),
            metrics=metrics,
        )

    def _train(
        self,
        runtime: LoraRuntime,
        phase: Phase,
        lr: float,
        seed: int,
        on_step: StepCallback | None,
    ) -> float:
        """One phase, on the same seeded batches and dropout as every other method."""
        cfg = runtime.cfg
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)
        with runtime.handle.mixing(phase.weights):
            return train_steps(
                runtime.handle.model,
                runtime.handle.trainable(phase.trains),
                shuffled_batches(
                    runtime.data.train,
                    cfg.federation.batch_size,
                    runtime.tokenizer.pad_token_id,
                    generator,
                ),
                cfg.federation.local_steps,
                lr,
                cfg.optim,
                on_step=on_step,
            )

    def _evaluate(self, runtime: LoraRuntime) -> dict[str, float]:
        """The loaded model on the client's validation and test splits, as ``val_*``/``test_*``."""
        return split_metrics(
            {
                split: self.evaluate_split(runtime, getattr(runtime.data.splits, split))
                for split in ("val", "test")
            }
        )

    def complete_round(
        self, cfg: Config, state: ServerState, updates: list[ClientUpdate]
    ) -> ServerState:
        store, _ = aggregate(state.store, updates, weighted=cfg.federation.weighted_aggregation)
        return ServerState(
            round=state.round + 1,
            store=store,
            architectures=[],
            lr=state.lr * cfg.optim.lr_decay,
        )

    def personal_state(
        self, state: ServerState, update: ClientUpdate, runtime: LoraRuntime
    ) -> StateDict:
        """The model the client is evaluated with: its private tensors plus the aggregated or
        the locally trained shared ones."""
        shared = state.store if self.evaluate_aggregated else update.weights
        return {**runtime.private, **shared}

    def evaluate_after_round(self, state: ServerState, runtime: LoraRuntime) -> dict[str, float]:
        if not self.evaluate_aggregated:
            return {}
        runtime.handle.load({**runtime.private, **state.store})
        return self._evaluate(runtime)

    def private_state(self, runtime: LoraRuntime) -> StateDict:
        return runtime.private

    def restore_private_state(self, runtime: LoraRuntime, state: StateDict) -> None:
        runtime.private = state

    def save_client(
        self,
        run_dir: Path,
        state: ServerState,
        payload: ClientPayload,
        update: ClientUpdate,
        runtime: LoraRuntime,
    ) -> None:
        cfg = runtime.cfg
        doc = {
            "client": update.client_id,
            "method": self.name,
            "round": payload.round,
            "base_model": cfg.model.name,
            "adapters": list(self.adapters),
            "lora": cfg.hmole.model_dump(
                mode="json", include={"rank", "alpha", "dropout", "target_modules"}
            ),
            "keys": "<adapter>/<PEFT state-dict key of that adapter>",
            **self.description(),
            **primary_test_metric(update.metrics),
        }
        weights = self.personal_state(state, update, runtime)
        save_client_model(run_dir, update.client_id, weights, ADAPTER_FILE, doc)


def load_client_model(
    run_dir: Path, client_id: int
) -> tuple[LoraMethod, LoraHandle, PreTrainedTokenizerBase]:
    """Rebuild a LoRA baseline client's saved model from ``run_dir/clients/<id>/``."""
    from fedamole.baselines import get_method  # the registry imports this module

    folder = Path(run_dir) / "clients" / str(client_id)
    doc = json.loads((folder / ADAPTER_FILE).read_text())
    method = get_method(doc["method"])
    handle, tokenizer = method.build(load_run_config(run_dir))
    handle.load(load_file(str(folder / "adapter.safetensors")))
    return method, handle, tokenizer


def train_single(trains: KeyRule) -> tuple[Phase, ...]:
    """One phase on the single adapter at full weight, updating the tensors ``trains`` picks."""
    return (Phase({DEFAULT: 1.0}, trains),)


def local() -> LoraMethod:
    """Each client fine-tunes its own LoRA on its own data; nothing is ever sent."""
    return LoraMethod(
        "local",
        shared=no_key,
        phases=train_single(every_key),
        evaluate_aggregated=False,
        communicates=False,
    )


def fedit() -> LoraMethod:
    """FedIT: FedAvg of one LoRA; each client is served the aggregated (global) model."""
    return LoraMethod("fedit", every_key, train_single(every_key), evaluate_aggregated=True)


def fedit_ft() -> LoraMethod:
    """FedIT-FT: FedIT, each client evaluated with the LoRA it just fine-tuned locally."""
    return LoraMethod("fedit-ft", every_key, train_single(every_key), evaluate_aggregated=False)


def ffa_lora() -> LoraMethod:
    """FFA-LoRA: A frozen at its seeded init, only B trained and averaged; global model served."""
    return LoraMethod("ffa-lora", lora_b_key, train_single(lora_b_key), evaluate_aggregated=True)
