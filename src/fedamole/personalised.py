"""Loading a client's personalised model from a finished run, ready to answer prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from fedamole.config import Config, ConfigError
from fedamole.data.example import Example
from fedamole.data.prompts import Prompter, build_prompter
from fedamole.evaluation import generate
from fedamole.hmole import HMoLEAdapter
from fedamole.methods.fedamole import build_hmole_model
from fedamole.reporting import ADAPTER_WEIGHTS, CONFIG_FILE, RunDir


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: --run must point at a fedamole run directory")
    return RunDir(run_dir).config()


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
    folder = RunDir(run_dir).client_folder(client_id)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{folder}/{ADAPTER_WEIGHTS} not found: no finished adapter for client {client_id} "
            f"in {run_dir} (clients are numbered from 0; the run must have completed)"
        )
    cfg = load_run_config(run_dir)
    adapter, tokenizer = build_hmole_model(cfg)
    adapter.set_architecture(json.loads((folder / "architecture.json").read_text())["architecture"])
    adapter.load_state(load_file(str(folder / ADAPTER_WEIGHTS)))
    return PersonalisedModel(adapter, build_prompter(tokenizer, cfg.data.prompt_format))
