"""A client's personalised model, for every method, ready to answer prompts.

``load_client_model(run_dir, client_id)`` rebuilds the model a finished run saved in
``clients/<id>/`` as a :class:`ClientModel`: the run's method restores it
(:meth:`~fedamole.federation.method.FederatedMethod.restore`) and says how it answers
(:meth:`~fedamole.federation.method.FederatedMethod.answer_groups`, the rule its evaluation used),
so the model served is the model evaluated, for every method. :func:`fedamole.serving.export.
load_pretrained` gives the same from an exported folder. ``fedamole generate`` is the
command-line face of :meth:`ClientModel.generate`.

This module is the one place where a request becomes model text (:func:`prompt_text`) and where
answers are generated (:meth:`ClientModel.generate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedamole.config import Config, ConfigError
from fedamole.data.example import UNLABELLED, DataError, Example
from fedamole.data.pipeline import ClientDataset, encode_client, prepare_client_splits
from fedamole.data.prompts import Prompter, build_prompter
from fedamole.data.splits import ClientSplits
from fedamole.evaluation import generate
from fedamole.federation.method import (
    AnswerGroup,
    ClientRuntime,
    FederatedMethod,
    build_base_model,
)
from fedamole.files import read_utf8
from fedamole.methods import get_method
from fedamole.reporting import ADAPTER_WEIGHTS, CLIENTS, CONFIG_FILE, RunDir, RunDirError
from fedamole.types import StateDict

# How a client's model answers examples: index groups, each under one context (its method's rule).
AnswerRule = Callable[[list[Example]], list[AnswerGroup]]


def all_at_once(examples: list[Example]) -> list[AnswerGroup]:
    """A model that answers every prompt as it is (an exported single-adapter model)."""
    return [(nullcontext(), list(range(len(examples))))]


def request_examples(
    instructions: str | Sequence[str], inputs: Sequence[str] | None = None
) -> list[Example]:
    """Instructions (and optional inputs/contexts, one per instruction) as examples to answer."""
    if isinstance(instructions, str):
        instructions = [instructions]
    inputs = [""] * len(instructions) if inputs is None else list(inputs)
    if len(inputs) != len(instructions):
        raise ValueError(f"got {len(instructions)} instructions but {len(inputs)} inputs")
    return [
        Example(instruction=i, input=x, output="", label=UNLABELLED)
        for i, x in zip(instructions, inputs, strict=True)
    ]


def read_prompt_file(path: Path) -> tuple[list[str], list[str]]:
    """Instructions and their inputs from a file: ``*.jsonl`` holds one JSON object per line with
    a string ``instruction`` and optionally ``input``; any other file one instruction per
    non-empty line (no inputs)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input-file {path}: no such file")
    lines = [(n, line) for n, line in enumerate(read_utf8(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"--input-file {path}: no prompts in it")
    if path.suffix != ".jsonl":
        return [line.strip() for _, line in lines], [""] * len(lines)
    rows = [_prompt_row(path, n, line) for n, line in lines]
    return [i for i, _ in rows], [x for _, x in rows]


def _prompt_row(path: Path, line_no: int, line: str) -> tuple[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{line_no}: not valid JSON ({exc.msg}); a .jsonl file holds one JSON object "
            "per line (use another extension for plain-text instructions)"
        ) from None
    if (
        not isinstance(row, dict)
        or not isinstance(row.get("instruction"), str)
        or not isinstance(row.get("input", ""), str)
    ):
        raise DataError(
            f'{path}:{line_no}: expected an object with a string "instruction" and optionally a '
            f'string "input", e.g. {{"instruction": "Sort these words", "input": "pear apple"}}'
        )
    return row["instruction"], row.get("input", "")


@dataclass
class ClientModel:
    """One client's personalised model: ``model`` is a ``transformers`` model (a ``PeftModel``
    for the PEFT baselines) in eval mode with the client's adapters in it, ``prompter`` the
    prompt format it was trained with (and its tokenizer), ``answer_rule`` how its method answers
    (a mix of adapters, FedDPA's per-prompt weights), which :meth:`generate` applies."""

    model: nn.Module
    prompter: Prompter
    name: str
    answer_rule: AnswerRule = all_at_once

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.prompter.tokenizer

    def generate(
        self,
        instructions: str | Sequence[str],
        inputs: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
    ) -> list[str]:
        """One answer per instruction (with its input, if given): greedy by default, sampled
        with ``do_sample`` (``seed`` makes the samples repeatable)."""
        examples = request_examples(instructions, inputs)
        if seed is not None:
            torch.manual_seed(seed)
        options = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p}
        answers = [""] * len(examples)
        for context, members in self.answer_rule(examples):
            group = [examples[i] for i in members]
            with context:
                texts = generate(
                    self.model, self.prompter, group, max_new_tokens, batch_size, **options
                )
            for i, text in zip(members, texts, strict=True):
                answers[i] = text
        return answers


# ---------------------------------------------------------------------------------- saved models
@dataclass(frozen=True)
class SavedClient:
    """A client's personalised model as a finished run saved it, checked before anything loads:
    the run, the method and the config it ran with, and the JSON that describes the model."""

    run: RunDir
    client_id: int
    method: FederatedMethod
    cfg: Config
    doc: dict[str, object]

    @property
    def name(self) -> str:
        return f"{self.method.name} client {self.client_id} of {self.run.path}"

    @property
    def folder(self) -> Path:
        return self.run.client_folder(self.client_id)

    def weights(self) -> StateDict:
        return load_file(str(self.folder / ADAPTER_WEIGHTS))


def open_saved_client(run_dir: Path, client_id: int, device: str | None = None) -> SavedClient:
    """The saved model of ``client_id`` in ``run_dir``; every reason it cannot be loaded is a
    :class:`RunDirError` naming the run and the client. ``device`` overrides ``model.device``."""
    run = RunDir(Path(run_dir))
    run.check_finished()
    method = get_method(run.method)
    folder = run.client_folder(client_id)
    description = folder / method.client_model_file
    if not description.is_file():
        saved = sorted(int(p.name) for p in (run.path / CLIENTS).glob("*") if p.name.isdigit())
        raise RunDirError(
            f"run {run.path} has no saved model for client {client_id} (saved: "
            f"{', '.join(map(str, saved)) or 'none'}; a client's model is saved when it takes "
            "part in the last round)"
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise RunDirError(_kept_on_node(run, client_id, method, description))
    cfg = _on_device(method.configure(run.config()), device)
    return SavedClient(run, client_id, method, cfg, json.loads(description.read_text()))


def _on_device(cfg: Config, device: str | None) -> Config:
    if device is not None:
        try:
            cfg.model.device = device
        except ValidationError:
            raise ConfigError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    return cfg


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


def _kept_on_node(run: RunDir, client_id: int, method: FederatedMethod, description: Path) -> str:
    """Where the client's node said it keeps the model (the run records it in ``description``)."""
    kept_at = json.loads(read_utf8(description)).get("kept_at")
    where = f"in {kept_at}/ on that node" if kept_at else "in the node's state folder"
    return (
        f"client {client_id} of run {run.path} ({method.name}) kept its model on its own Flower "
        f"node: it holds tensors that never leave the organisation. It is {where}; copy its "
        f"{ADAPTER_WEIGHTS} into {run.client_folder(client_id)}/ to load it from this run"
    )


def rebuild(saved: SavedClient) -> ClientRuntime:
    """The client as its method restores it: the method's model with the client's saved
    personalised model in it, in eval mode, on the client's data when answering needs it (else
    on empty splits: nothing else reads them)."""
    handle, tokenizer = saved.method.build(saved.cfg)
    prompter = build_prompter(tokenizer, saved.cfg.data.prompt_format)
    data = client_data(saved, prompter) if saved.method.serves_from_client_data else None
    runtime = saved.method.runtime(handle, tokenizer, saved.cfg, data or no_data(saved, prompter))
    saved.method.restore(runtime, saved.weights(), saved.doc)
    handle.model.eval()
    return runtime


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
