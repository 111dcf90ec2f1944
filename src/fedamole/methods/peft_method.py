"""The base every PEFT-adapter method here is built on: :class:`PeftMethod` (FedAvg over the
``shared`` tensors of named PEFT adapters, local training in ``phases``), the handles that swap
adapter states in and out of one shared backbone (:class:`AdapterHandle`; :class:`LoraHandle`
mixes LoRA adapters at any weights; :class:`RowLoraHandle` serves one per row), and the key rules
that say which tensors travel.

State travels as flat dicts keyed ``"<adapter>/<PEFT parameter name without the adapter>"`` (for
LoRA: PEFT's state-dict key), so aggregation, checkpoints and ``clients/<id>/adapter.safetensors``
handle it like any other state. The LoRA baselines (:mod:`fedamole.methods.lora`), the
prompt-learning ones (:mod:`fedamole.methods.fedprompt`, :mod:`fedamole.methods.fedptuning`),
FDLoRA, FedDPA, FedSA-LoRA, FedALT and fedit-wide are rules on this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedamole.aggregation import aggregate
from fedamole.config import Config, HMoLEConfig
from fedamole.data.example import Example
from fedamole.data.pipeline import ClientDataset
from fedamole.federation.client import evaluate_client
from fedamole.federation.method import AnswerGroup, ClientRuntime, FederatedMethod, PerRowHandle
from fedamole.federation.training import StepCallback, round_seed, shuffled_batches, train_steps
from fedamole.models import build_base_model
from fedamole.types import (
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    ServerState,
    StateDict,
)

KeyRule = Callable[[str], bool]
DEFAULT = "default"


def every_key(key: str) -> bool:
    return True


def no_key(key: str) -> bool:
    return False


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


class AdapterHandle:
    """A frozen backbone with named PEFT adapters, shared by every simulated client: states are
    swapped in and out as flat dicts of the adapters' parameters. A prompt-learning adapter runs
    alone and unscaled; :class:`LoraHandle` mixes LoRA adapters at any weights."""

    def __init__(self, model: PeftModel, adapters: tuple[str, ...], belongs: KeyRule) -> None:
        self.model = model
        self.adapters = adapters
        self.params = flat_parameters(model, adapters, belongs)

    def state(self) -> StateDict:
        """Every adapter's tensors, as detached CPU copies."""
        return {key: param.detach().cpu().clone() for key, param in self.params.items()}

    @torch.no_grad()
    def load(self, state: StateDict) -> None:
        """Load a complete state (every tensor of every adapter must be there)."""
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(
                f"adapter state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
            )
        for key, param in self.params.items():
            param.copy_(state[key])

    def trainable(self, rule: KeyRule) -> list[nn.Parameter]:
        """Unfreeze exactly the tensors ``rule`` selects; all other adapter tensors stay frozen."""
        for key, param in self.params.items():
            param.requires_grad_(rule(key))
        return [param for key, param in self.params.items() if rule(key)]

    @contextmanager
    def mixing(self, weights: dict[str, float]) -> Iterator[None]:
        """Run with one adapter active at full weight (a soft prompt cannot be scaled)."""
        if len(weights) != 1 or set(weights.values()) != {1.0}:
            raise ValueError(f"prompt adapters run one at a time at weight 1, got {weights}")
        self.model.set_adapter(next(iter(weights)))
        yield


class LoraHandle(AdapterHandle):
    """Named PEFT LoRA adapters, which can run together, each at its own weight."""

    def __init__(self, model: PeftModel, adapters: tuple[str, ...]) -> None:
        super().__init__(model, adapters, lambda name: ".lora_" in name)
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

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


class RowLoraHandle(LoraHandle, PerRowHandle):
    """One LoRA adapter, which PEFT's mixed-adapter batches (``adapter_names``) can give each row
    of a batch in its own client's copy."""

    @torch.no_grad()
    def keep(self, key: str) -> None:
        """Copy the single adapter into a new PEFT adapter named ``key``, in the model's mode
        (PEFT creates its layers in training mode: their dropout would sample every answer)."""
        (adapter,) = self.adapters
        training = self.model.training
        self.model.add_adapter(key, self.model.peft_config[adapter])
        self.model.train(training)
        kept = flat_parameters(self.model, (key,), lambda name: ".lora_" in name)
        for flat, param in self.params.items():
            kept[flat.replace(f"{adapter}/", f"{key}/", 1)].copy_(param)

    def forget(self, key: str) -> None:
        self.model.delete_adapter(key)

    @contextmanager
    def rows(self, keys: list[str]) -> Iterator[dict[str, object]]:
        """Row i on the adapter kept under ``keys[i]``: PEFT's own ``adapter_names``, refused
        here in training mode with the setting to change."""
        if self.model.training:
            raise RuntimeError(
                "per-row adapters (rows of different clients in one batch) are for inference "
                "only; call model.eval() first"
            )
        yield {"adapter_names": list(keys)}


def flat_parameters(
    model: PeftModel, adapters: tuple[str, ...], belongs: KeyRule
) -> dict[str, nn.Parameter]:
    """Adapter parameters (those whose name ``belongs``) under flat keys ``"<adapter>/<name
    without the adapter>"``: PEFT names them ``...lora_A.<adapter>.weight`` or
    ``prompt_encoder.<adapter>.embedding.weight``; for LoRA the key is PEFT's state-dict key."""
    out: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        for adapter in adapters:
            marker = f".{adapter}."
            if belongs(name) and marker in name:
                out[f"{adapter}/{name.replace(marker, '.', 1)}"] = param
    return out


PeftRuntime = ClientRuntime[AdapterHandle]


@dataclass(frozen=True)
class Phase:
    """A stretch of local training: the active adapters with their weights, and what learns."""

    weights: dict[str, float]
    trains: KeyRule


@dataclass
class PeftMethod(FederatedMethod[AdapterHandle]):
    """A LoRA baseline: FedAvg over the ``shared`` tensors of PEFT adapters (see module doc)."""

    name: str
    shared: KeyRule
    phases: tuple[Phase, ...]
    evaluates_after_aggregation: bool
    shares_personal_model: bool = True
    adapters: tuple[str, ...] = (DEFAULT,)
    initial: StateDict = field(default_factory=dict, init=False, repr=False)

    # ----------------------------------------------------------------- rules a subclass may change
    def serving_weights(self, runtime: PeftRuntime) -> dict[str, float]:
        """The weight of each adapter in the client's model: every adapter at full weight."""
        return {adapter: 1.0 for adapter in self.adapters}

    def answer_groups(self, runtime: PeftRuntime, examples: list[Example]) -> list[AnswerGroup]:
        """All examples at once, the adapters at their serving weights."""
        mixing = runtime.handle.mixing(self.serving_weights(runtime))
        return [(mixing, list(range(len(examples))))]

    def answer_doc(self, runtime: PeftRuntime) -> dict[str, object]:
        return {"rule": self.inference(), "adapter_weights": self.serving_weights(runtime)}

    def restore(
        self, runtime: PeftRuntime, model: StateDict, description: Mapping[str, object]
    ) -> None:
        """The adapters' tensors into the handle; what the model holds besides them (FDLoRA's
        fusion weights) becomes the client's private state, where the serving weights read it."""
        runtime.handle.load(model)
        runtime.private = dict(model)

    def inference(self) -> str:
        """How a saved client model is used at inference (for its JSON)."""
        return "every adapter added at full weight (alpha / r)"

    def lora_settings(self, cfg: Config, model: PreTrainedModel) -> LoraConfig:
        """The LoRA each adapter is (here: FedAMoLE's rank, alpha, dropout and targets)."""
        return lora_config(cfg.hmole)

    def attach(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: Config
    ) -> AdapterHandle:
        """The method's adapters on the frozen backbone (here: LoRA, A Kaiming-uniform, B = 0)."""
        config = self.lora_settings(cfg, model)
        peft_model = get_peft_model(model, config, adapter_name=self.adapters[0])
        for adapter in self.adapters[1:]:
            peft_model.add_adapter(adapter, config)
        if self.adapters == (DEFAULT,):  # one LoRA at full weight: served per row
            return RowLoraHandle(peft_model, self.adapters)
        return LoraHandle(peft_model, self.adapters)

    def adapter_settings(self, cfg: Config) -> dict[str, object]:
        """The adapter hyper-parameters a saved client model needs to be rebuilt."""
        return {
            "lora": cfg.hmole.model_dump(
                mode="json", include={"rank", "alpha", "dropout", "target_modules"}
            )
        }

    # ----------------------------------------------------------------- both sides
    def build(self, cfg: Config) -> tuple[AdapterHandle, PreTrainedTokenizerBase]:
        model, tokenizer = build_base_model(cfg)
        torch.manual_seed(cfg.seed)  # adapter init from the run seed
        handle = self.attach(model, tokenizer, cfg)
        self.initial = handle.state()
        return handle, tokenizer

    def runtime(
        self,
        handle: AdapterHandle,
        tokenizer: PreTrainedTokenizerBase,
        cfg: Config,
        data: ClientDataset,
    ) -> PeftRuntime:
        """A client starts from the run's seeded adapters; what it never shares stays its own."""
        private = {k: v for k, v in self.initial.items() if not self.shared(k)}
        return PeftRuntime(handle, tokenizer, cfg, data, private)

    # ----------------------------------------------------------------- server side
    def init_state(
        self, cfg: Config, handle: AdapterHandle, participants: list[int]
    ) -> ServerState:
        store = {k: v for k, v in self.initial.items() if self.shared(k)}
        return ServerState(0, store, cfg.optim.lr, participants)

    def complete_round(
        self,
        cfg: Config,
        state: ServerState,
        updates: list[ClientUpdate],
        next_participants: list[int],
    ) -> tuple[ServerState, Metrics]:
        store, _ = aggregate(state.store, updates, weighted=cfg.federation.weighted_aggregation)
        lr = state.lr * cfg.optim.lr_decay
        return ServerState(state.round + 1, store, lr, next_participants), {}

    def describe(self, cfg: Config, payload: ClientPayload) -> dict[str, object]:
        return {
            "base_model": cfg.model.name,
            "adapters": list(self.adapters),
            **self.adapter_settings(cfg),
            "keys": "<adapter>/<PEFT parameter name without the adapter name>",
            "inference": self.inference(),
        }

    # ----------------------------------------------------------------- client side
    def client_round(
        self, payload: ClientPayload, runtime: PeftRuntime, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Download -> local training phases -> (local evaluation) -> upload the shared part."""
        runtime.handle.load({**runtime.private, **payload.weights})
        seed = round_seed(runtime.cfg.seed, payload.round, runtime.data.client_id)
        losses = [self._train(runtime, phase, payload.lr, seed, on_step) for phase in self.phases]
        trained = runtime.handle.state()
        runtime.private = {k: v for k, v in trained.items() if not self.shared(k)}
        metrics: Metrics = {"train_loss": sum(losses) / len(losses)}
        scores = {}
        if not self.evaluates_after_aggregation:
            evaluated, scores = self._evaluate(runtime)
            metrics |= evaluated
        return ClientUpdate(
            client_id=runtime.data.client_id,
            weights={k: v for k, v in trained.items() if self.shared(k)},
            num_examples=len(runtime.data.train),
            metrics=metrics,
            example_scores=scores,
        )

    def _train(
        self,
        runtime: PeftRuntime,
        phase: Phase,
        lr: float,
        seed: int,
        on_step: StepCallback | None,
    ) -> float:
        """One phase: its adapters at their weights, the tensors it trains."""
        mixing = runtime.handle.mixing(phase.weights)
        return train_adapters(runtime, mixing, phase.trains, lr, seed, on_step)

    def _evaluate(self, runtime: PeftRuntime) -> tuple[Metrics, dict[str, list[float]]]:
        return evaluate_client(self, runtime)

    def evaluate(self, payload: ClientPayload, runtime: PeftRuntime) -> ClientEvaluation:
        """The aggregated shared tensors with this client's private ones."""
        runtime.handle.load({**runtime.private, **payload.weights})
        metrics, scores = self._evaluate(runtime)
        return ClientEvaluation(runtime.data.client_id, metrics, scores)


def train_adapters(
    runtime: ClientRuntime,
    context: AbstractContextManager[object],
    trains: KeyRule,
    lr: float,
    seed: int,
    on_step: StepCallback | None,
) -> float:
    """Local steps on the adapter tensors ``trains`` picks, under ``context`` (the adapters as
    the client's model runs them), on the same seeded batches and dropout as every other
    method; the mean loss."""
    cfg = runtime.cfg
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    with context:
        return train_steps(
            runtime.handle.model,
            runtime.handle.trainable(trains),
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


def train_single(trains: KeyRule) -> tuple[Phase, ...]:
    """One phase on the single adapter at full weight, updating the tensors ``trains`` picks."""
    return (Phase({DEFAULT: 1.0}, trains),)
