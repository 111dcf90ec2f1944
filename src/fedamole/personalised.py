"""Building an HMoLE model from a config, and loading a client's personalised model from a run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from fedamole.config import Config, ConfigError, load_config
from fedamole.data.example import Example
from fedamole.data.prompts import Prompter, build_prompter
from fedamole.evaluation import generate
from fedamole.hmole import HMoLEAdapter, inject_hmole
from fedamole.models import load_base_model

CONFIG_FILE = "config.yaml"


def build_hmole_model(cfg: Config) -> tuple[HMoLEAdapter, PreTrainedTokenizerBase]:
    """The configured frozen base model with HMoLE injected (no architecture set yet)."""
    model, tokenizer = load_base_model(cfg.model.name, cfg.model.dtype)
    h = cfg.hmole
    return inject_hmole(model, h.target_modules, h.rank, h.alpha, h.dropout, h.top_k), tokenizer


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: --run must point at a fedamole run directory")
    return load_config(path)


@dataclass
class PersonalisedModel:
    """One client's model: the frozen backbone with its own experts, ready to answer."""

    adapter: HMoLEAdapter
    prompter: Prompter

    def answer(self, instruction: str, input_text: str = "", max_new_tokens: int = 64) -> str:
        example = Example(instruction=instruction, input=input_text, output="", label="")
        return generate(self.adapter.model, self.prompter, [example], max_new_tokens, 1)[0]


def load_client_model(run_dir: Path, client_id: int) -> PersonalisedModel:
    """Rebuild a client's personalised model from ``run_dir/clients/<id>/``."""
    folder = Path(run_dir) / "clients" / str(client_id)
    if not (folder / "adapter.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder}/adapter.safetensors not found: no finished adapter for client {client_id} "
            f"in {run_dir} (clients are numbered from 0; the run must have completed)"
        )
    cfg = load_run_config(run_dir)
    adapter, tokenizer = build_hmole_model(cfg)
    adapter.set_architecture(json.loads((folder / "architecture.json").read_text())["architecture"])
    adapter.load_state(load_file(str(folder / "adapter.safetensors")))
    return PersonalisedModel(adapter, build_prompter(tokenizer, cfg.data.prompt_format))
