"""Loading a client's personalised model: from a finished run's ``clients/<id>/`` or from a
folder ``fedamole export`` wrote. Everything that reads a saved model is here, and
:func:`client_runtime` is the one function that builds a served client's runtime: ``fedamole
generate``, ``fedamole export`` and the server's pools (:mod:`fedamole.serving.pool`) all restore
a client through it, so the model served is the model evaluated, for every method.

``load_client_model(run_dir, client_id)`` rebuilds the model as a
:class:`~fedamole.serving.personalised.ClientModel`: the run's method restores it
(:meth:`~fedamole.federation.method.FederatedMethod.restore`) and says how it answers
(:meth:`~fedamole.federation.method.FederatedMethod.answer_groups`, the rule its evaluation
used). :func:`load_pretrained` gives the same from an exported folder alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from fedamole.config import Config, ConfigError
from fedamole.data.example import Example
from fedamole.data.pipeline import ClientDataset, encode_client, prepare_client_splits
from fedamole.data.prompts import Prompter, build_prompter
from fedamole.data.splits import ClientSplits
from fedamole.errors import UserError
from fedamole.federation.method import AnswerGroup, ClientRuntime, FederatedMethod, ModelHandle
from fedamole.files import read_utf8
from fedamole.methods import get_method
from fedamole.methods.fedamole import build_hmole_model
from fedamole.methods.peft_method import LoraHandle
from fedamole.models import build_base_model
from fedamole.reporting import ADAPTER_WEIGHTS, CLIENTS, CONFIG_FILE, RunDir, RunDirError
from fedamole.serving.personalised import ClientModel
from fedamole.types import StateDict

MODEL_FILE = "fedamole_model.json"  # in every export: what it is and where it came from
MIXING_FILE = "mixing.json"  # how a model with several adapters mixes them (its method's rule)
ADAPTER_WEIGHTS_KEY = "adapter_weights"  # in MIXING_FILE: fixed weight per adapter, if fixed
README = "README.md"
# In an export whose adapters its method mixes by a learned rule (a router): the client's saved
# model and the run's config, so `load_pretrained` rebuilds it through the method, as from a run.
CLIENT_FOLDER = "client"


class ExportError(UserError, ValueError):
    """An export that cannot be written or loaded as asked; the message says what to do."""


# ---------------------------------------------------------------------------------- saved models
@dataclass(frozen=True)
class SavedClient:
    """A client's personalised model as a finished run saved it, checked before anything loads:
    the run, the method and the config it ran with, and the JSON that describes the model."""

    origin: Path  # the run (or the export) it was read from
    run_id: str
    client_id: int
    method: FederatedMethod
    cfg: Config
    doc: dict[str, object]
    folder: Path  # where its tensors and its description are

    @property
    def name(self) -> str:
        return f"{self.method.name} client {self.client_id} of {self.origin}"

    def weights(self) -> StateDict:
        """The saved tensors, read from the run each time (nothing keeps a copy)."""
        return load_file(str(self.folder / ADAPTER_WEIGHTS))


def saved_client_ids(run_dir: Path) -> list[int]:
    """Every client with a saved model in a finished run, in order."""
    run = RunDir(Path(run_dir))
    run.check_finished()
    return _saved_ids(run)


def _saved_ids(run: RunDir) -> list[int]:
    return sorted(int(p.name) for p in (run.path / CLIENTS).glob("*") if p.name.isdigit())


def open_saved_client(run_dir: Path, client_id: int, device: str | None = None) -> SavedClient:
    """The saved model of ``client_id`` in ``run_dir``; every reason it cannot be loaded is a
    :class:`RunDirError` naming the run and the client. ``device`` overrides ``model.device``."""
    run = RunDir(Path(run_dir))
    run.check_finished()
    method = get_method(run.method)
    folder = run.client_folder(client_id)
    description = folder / method.client_model_file
    if not description.is_file():
        raise RunDirError(
            f"run {run.path} has no saved model for client {client_id} (saved: "
            f"{', '.join(map(str, _saved_ids(run))) or 'none'}; a client's model is saved when it takes "
            "part in the last round)"
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise RunDirError(_kept_on_node(run, client_id, method, description))
    cfg = _on_device(method.configure(run.config()), device)
    doc = json.loads(description.read_text())
    return SavedClient(run.path, run.run_id, client_id, method, cfg, doc, folder)


def _on_device(cfg: Config, device: str | None) -> Config:
    if device is not None:
        try:
            cfg.model.device = device
        except ValidationError:
            raise ConfigError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    return cfg


def _kept_on_node(run: RunDir, client_id: int, method: FederatedMethod, description: Path) -> str:
    """Where the client's node said it keeps the model (the run records it in ``description``)."""
    kept_at = json.loads(read_utf8(description)).get("kept_at")
    where = f"in {kept_at}/ on that node" if kept_at else "in the node's state folder"
    return (
        f"client {client_id} of run {run.path} ({method.name}) kept its model on its own Flower "
        f"node: it holds tensors that never leave the organisation. It is {where}; copy its "
        f"{ADAPTER_WEIGHTS} into {run.client_folder(client_id)}/ to load it from this run"
    )


def load_base_model_of(run_dir: Path, device: str | None = None) -> ClientModel:
    """The run's frozen base model without any adapter, prompted in the run's format: what a
    client's model answers differently is what its fine-tuning changed."""
    run = RunDir(Path(run_dir))
    if not (run.path / CONFIG_FILE).is_file():
        raise RunDirError(f"--run {run.path}: not a run directory (no {CONFIG_FILE})")
    cfg = _on_device(run.config(), device)
    model, tokenizer = build_base_model(cfg)
    prompter = build_prompter(tokenizer, cfg.data.prompt_format)
    return ClientModel(model.eval(), prompter, f"base model {cfg.model.name} of {run.path}")


# ---------------------------------------------------------------------------------- runtimes
def backbone(saved: SavedClient) -> tuple[ModelHandle, Prompter]:
    """The run's method built once (backbone and adapters), with the run's prompt format."""
    handle, tokenizer = saved.method.build(saved.cfg)
    return handle, build_prompter(tokenizer, saved.cfg.data.prompt_format)


def client_runtime(saved: SavedClient, handle: ModelHandle, prompter: Prompter) -> ClientRuntime:
    """The client as its method restores it into ``handle``: its saved personalised model read
    from the run, in eval mode, on the client's data when answering needs it (else on empty
    splits: nothing else reads them)."""
    data = client_data(saved, prompter) if saved.method.serves_from_client_data else None
    runtime = saved.method.runtime(
        handle, prompter.tokenizer, saved.cfg, data or no_data(saved, prompter)
    )
    saved.method.restore(runtime, saved.weights(), saved.doc)
    handle.model.eval()
    return runtime


def rebuild(saved: SavedClient) -> ClientRuntime:
    """The client alone on its own backbone."""
    return client_runtime(saved, *backbone(saved))


def client_data(saved: SavedClient, prompter: Prompter) -> ClientDataset:
    """The client's own splits, rebuilt from the run's data settings (its data must be here)."""
    splits = prepare_client_splits(saved.cfg)[saved.client_id]
    return encode_client(saved.client_id, splits, prompter, saved.cfg.model.max_length)


def no_data(saved: SavedClient, prompter: Prompter) -> ClientDataset:
    """A client with no examples, for methods whose answers need none of its data."""
    empty = ClientSplits(train=[], aux=[], val=[], test=[])
    return ClientDataset(saved.client_id, empty, [], [], prompter, classification=False)


def client_model(saved: SavedClient, runtime: ClientRuntime) -> ClientModel:
    def answer_rule(examples: list[Example]) -> list[AnswerGroup]:
        return saved.method.answer_groups(runtime, examples)

    return ClientModel(runtime.handle.model, runtime.data.prompter, saved.name, answer_rule)


def load_client_model(run_dir: Path, client_id: int, device: str | None = None) -> ClientModel:
    """Rebuild ``client_id``'s personalised model from a finished run (any method); ``device``
    overrides the run's ``model.device`` (e.g. ``"cpu"``)."""
    saved = open_saved_client(run_dir, client_id, device)
    return client_model(saved, rebuild(saved))


# ---------------------------------------------------------------------------------- exports
def load_pretrained(path: Path, base_model: str | None = None, device: str = "auto") -> ClientModel:
    """An exported client model, ready to answer, from its folder alone: the FedAMoLE routed
    model (or a single-adapter PEFT export) on its base model, in eval mode, with its tokenizer.
    ``base_model`` replaces the recorded base (another folder or hub id of the same weights)."""
    folder = Path(path)
    doc = read_export(folder)
    if CLIENT_FOLDER in doc:
        saved = exported_client(folder, doc, base_model, device)
        return client_model(saved, rebuild(saved))
    cfg = _base_config(doc, base_model, device, folder)
    name = f"{doc['source']['method']} client {doc['source']['client']} exported to {folder}"
    if doc["kind"] == "hmole":
        adapter, tokenizer = build_hmole_model(cfg)
        adapter.set_architecture(doc["architecture"])
        adapter.load_state(load_file(str(folder / doc["weights"])))
        return ClientModel(adapter.model.eval(), _prompter(tokenizer, doc), name)
    adapters = doc.get("adapters", ["default"])
    base, tokenizer = build_base_model(cfg)
    if adapters == ["default"]:
        model = PeftModel.from_pretrained(base, folder).eval()
        return ClientModel(model, _prompter(tokenizer, doc), name)
    weights = _fixed_weights(folder)
    model = PeftModel.from_pretrained(base, folder / adapters[0], adapter_name=adapters[0])
    for adapter in adapters[1:]:
        model.load_adapter(folder / adapter, adapter_name=adapter)
    handle = LoraHandle(model.eval(), tuple(adapters))

    def at_fixed_weights(examples: list[Example]) -> list[AnswerGroup]:
        return [(handle.mixing(weights), list(range(len(examples))))]

    return ClientModel(model, _prompter(tokenizer, doc), name, at_fixed_weights)


def exported_client(folder: Path, doc: dict, base_model: str | None, device: str) -> SavedClient:
    """The saved client an export carries (see :data:`CLIENT_FOLDER`), checked as a run's is."""
    saved = folder / doc[CLIENT_FOLDER]
    method = get_method(doc["source"]["method"])
    cfg = method.configure(RunDir(saved).config())
    if base_model is not None:
        cfg.model.name = base_model
    description = json.loads(read_utf8(saved / method.client_model_file))
    source = doc["source"]
    return SavedClient(
        folder,
        source["run_id"],
        source["client"],
        method,
        _on_device(cfg, device),
        description,
        saved,
    )


def _fixed_weights(folder: Path) -> dict[str, float]:
    """The adapters' fixed weights from ``mixing.json``; a per-prompt mix cannot load alone."""
    path = folder / MIXING_FILE
    mixing = json.loads(path.read_text()) if path.is_file() else {}
    weights = mixing.get(ADAPTER_WEIGHTS_KEY)
    if not isinstance(weights, dict):
        raise ExportError(
            f"{folder} holds adapters mixed per prompt ({mixing.get('rule', 'see ' + README)}): "
            f"load them with PEFT as its {README} shows"
        )
    return {str(name): float(weight) for name, weight in weights.items()}


def _prompter(tokenizer: PreTrainedTokenizerBase, doc: dict) -> Prompter:
    """The prompt format the model was trained with (exports before formats existed: Alpaca)."""
    return build_prompter(tokenizer, doc.get("prompt_format", "alpaca"))


def read_export(folder: Path) -> dict:
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise ExportError(
            f"{path} not found: {folder} is not a folder written by `fedamole export`"
        )
    return json.loads(path.read_text())


def _base_config(doc: dict, base_model: str | None, device: str, folder: Path) -> Config:
    try:
        return Config.model_validate(
            {
                "model": {
                    "name": base_model or doc["base_model"],
                    "dtype": doc["dtype"],
                    "quantization": doc.get("quantization", "none"),
                    "device": device,
                },
                "hmole": doc.get("hmole", {}),
            }
        )
    except ValidationError as err:
        raise ExportError(f"{folder / MODEL_FILE}: unusable settings: {err}") from None
