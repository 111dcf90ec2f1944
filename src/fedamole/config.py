"""One validated configuration for a FedAMoLE run: loadable from YAML, overridable from the CLI.

The defaults are the small CPU demo that `make run` executes; `configs/` holds the real scenarios
and the paper-sized preset.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedamole.errors import UserError
from fedamole.files import TextFileError, read_utf8
from fedamole.types import WireDtype

PromptFormat = Literal["auto", "chat", "alpaca"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m", description="smollm2-135m, tiny-random-llama, a hub id or a folder"
    )
    device: str = Field(
        "auto", description="auto (cuda when available, else cpu), cpu, cuda or cuda:N"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the frozen backbone (auto: bf16 where the device computes it "
        "natively, else float32); adapters keep float32 master weights",
    )
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none",
        description="the frozen backbone's linear layers in 4-bit NF4 (bitsandbytes) or int8 "
        "weight-only (torchao), for every method; adapters stay float32 (needs the quant extra)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30 % more time"
    )
    max_length: int = Field(192, gt=8, description="examples longer than this (tokens) are dropped")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"model.device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


DataFormat = Literal["auto", "alpaca", "messages", "prompt_completion"]


class ColumnMap(_Section):
    """Which field (JSONL) or column (Hugging Face set) holds each part of an example.

    None = the usual names: instruction; input or context; output or response; label or
    category. A named field must be present in every row; the unnamed input and label are
    optional (empty input; label `default`, which label-defined partitions reject).
    """

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    label: str | None = None


class DataConfig(_Section):
    source: Literal["synthetic", "dolly", "natural_instructions", "snli", "jsonl", "hf"] = Field(
        "synthetic", description="hf = any Hugging Face data set (data.path folder or data.hf_id)"
    )
    path: Path | None = Field(None, description="local file/folder; None = built-in or hub")
    format: DataFormat = Field(
        "auto", description="row shape of jsonl/hf data; auto = detected from the first row"
    )
    columns: ColumnMap = Field(default_factory=ColumnMap)
    hf_id: str | None = Field(None, description="hub id of a data set (data.source=hf)")
    hf_split: str = Field("train", description="split of a hub or saved data set (source=hf)")
    partition: Literal["dirichlet", "task", "groups", "iid"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    num_groups: int = Field(
        2, ge=1, description="client groups with disjoint tasks (data.partition=groups)"
    )
    min_client_size: int = Field(20, ge=1)
    synthetic_per_task: int = Field(120, ge=1, description="synthetic examples per task family")
    max_examples: int | None = Field(None, ge=1, description="cap on examples read from the source")
    train_frac: float = Field(0.76, gt=0, lt=1)
    aux_frac: float = Field(0.04, gt=0, lt=1)
    val_frac: float = Field(0.10, gt=0, lt=1)
    test_frac: float = Field(0.10, gt=0, lt=1)
    aux_cap: int = Field(200, ge=1)
    test_cap: int | None = Field(None, ge=1, description="None: 200 classification, 50 generation")
    val_cap: int | None = Field(None, ge=1)
    prompt_format: PromptFormat = Field(
        "auto", description="auto = the tokenizer's chat template if it has one, else Alpaca"
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> DataConfig:
        total = self.train_frac + self.aux_frac + self.val_frac + self.test_frac
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.*_frac must sum to 1, got {total:.4f}")
        return self


class HMoLEConfig(_Section):
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"]
    )
    num_experts: int = Field(8, ge=1, description="N_e domain experts per adapted module")
    rank: int = Field(8, gt=0, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    top_k: int = Field(2, ge=1)


class FederationConfig(_Section):
    num_clients: int = Field(4, ge=1)
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    weighted_aggregation: bool = False
    clients_per_round: int | float | None = Field(
        None,
        description="clients sampled each round: a count (2), a fraction (0.5) or None for all",
    )
    wire_dtype: WireDtype = Field(
        "float32", description="dtype of the weights that travel between server and clients"
    )

    @field_validator("clients_per_round")
    @classmethod
    def _positive_participation(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, int) and value < 1:
            raise ValueError(f"federation.clients_per_round must be >= 1, got {value}")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(
                f"federation.clients_per_round as a fraction must be in (0, 1], got {value}"
            )
        return value

    @property
    def participants_per_round(self) -> int:
        """How many clients take part in each round (all of them by default, as in the paper)."""
        value = self.clients_per_round
        if value is None:
            return self.num_clients
        if isinstance(value, float):
            return max(1, round(value * self.num_clients))
        return value


class RSEAConfig(_Section):
    mode: Literal["rsea", "random", "homogeneous", "continuity"] = Field(
        "rsea",
        description=(
            "rsea = FedAMoLE; random = FedAMoLE-R; homogeneous = FedAMoLE-H; continuity = "
            "FedAMoLE-C (RSEA whose objective favours an expert's current holders by one "
            "standard deviation of its scores)"
        ),
    )
    clients_per_expert: int = Field(2, ge=1, description="k_c")
    min_experts: int | None = Field(None, ge=1, description="k_min; None = hmole.top_k")
    max_experts: int = Field(8, ge=1, description="M")


class PrivacyConfig(_Section):
    enabled: bool = False
    eta: float = Field(100.0, gt=0, description="larger eta = less noise")
    clip_norm: float = Field(
        0.75,
        gt=0,
        description=(
            "bound each embedding is clipped to before noise; the guarantee is eta-metric DP "
            "over vectors at most 2 * clip_norm apart, so calibrate it to the emb_norm_median "
            "and emb_norm_max a non-private run logs (SmolLM2-135M: round 0 median 0.37, max "
            "0.74; after 8 steps median 0.44-0.52, max 1.0-1.1, 9-19 % of vectors clipped)"
        ),
    )
    seed: int | None = Field(
        None, description="for tests only: seeds the noise; None draws it from OS entropy"
    )


class OptimConfig(_Section):
    lr: float = Field(3e-4, gt=0)
    lr_decay: float = Field(0.99, gt=0, le=1, description="multiplied into lr every round")
    weight_decay: float = Field(0.0, ge=0)
    adam_eps: float = Field(1e-8, gt=0, description="Adam's epsilon (the paper's code: 1e-6)")
    grad_clip: float | None = Field(
        1.0, gt=0, description="max global grad norm, applied alike by every method; None = off"
    )
    lb_weight: float = Field(0.001, ge=0, description="lambda_lb")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="torch.autocast for forward passes (training and evaluation)"
    )
    loss_logits: Literal["labelled", "all"] = Field(
        "labelled",
        description="training computes the vocabulary logits only where they predict a "
        "labelled (response) token (labelled), or at every position as the model's own loss "
        "does (all, the slower path kept for comparison); the loss is the same",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        """YAML reads a bare ``no`` (``--set optim.mixed_precision=no``) as false."""
        return "no" if value is False else value


class BaselinesConfig(_Section):
    """Settings of the prompt-learning baselines and FDLoRA that FedAMoLE's own sections do not
    cover (the LoRA baselines take rank, alpha, dropout and targets from ``hmole``).

    20 virtual tokens: Lester et al. (2021) found prompt-tuning quality flat beyond 20 tokens, and
    the FedAMoLE authors' code runs P-tuning with 20. Vocabulary init: PEFT's random init draws
    N(0, 1) entries, far larger than a backbone's token embeddings; sampled vocabulary embeddings
    start at their scale without naming a task (``text`` needs one).
    """

    num_virtual_tokens: int = Field(
        20, ge=1, description="soft-prompt length of fedprompt and fedptuning"
    )
    prompt_tuning_init: Literal["vocab", "random", "text"] = Field(
        "vocab",
        description="fedprompt init: embeddings of random vocabulary tokens, N(0, 1), or of "
        "prompt_tuning_init_text (repeated or cut to num_virtual_tokens)",
    )
    prompt_tuning_init_text: str | None = Field(
        None, description="the text prompt_tuning_init=text starts from"
    )
    ptuning_encoder: Literal["mlp", "lstm"] = Field(
        "mlp", description="fedptuning's prompt encoder (PEFT's reparameterisation)"
    )
    ptuning_hidden_size: int | None = Field(
        None, ge=1, description="fedptuning encoder width; None = the backbone's hidden size"
    )
    fdlora_sync_every: int = Field(
        5,
        ge=1,
        description="fdlora: the personal LoRA becomes the client's locally trained LoRA in "
        "rounds 0, k, 2k, ... (the FedAMoLE authors' default k)",
    )
    fdlora_outer_lr: float = Field(1.0, gt=0, description="fdlora: server (outer) SGD step size")
    fdlora_outer_momentum: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="fdlora: Nesterov momentum of the outer step; 0 with outer_lr 1 = FedAvg",
    )

    @model_validator(mode="after")
    def _init_text_given(self) -> BaselinesConfig:
        if self.prompt_tuning_init == "text" and not (self.prompt_tuning_init_text or "").strip():
            raise ValueError(
                "baselines.prompt_tuning_init=text needs baselines.prompt_tuning_init_text, "
                "e.g. 'Answer the instruction.'"
            )
        return self


class EvalConfig(_Section):
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    choice_scoring: Literal["shared_prompt", "full"] = Field(
        "shared_prompt",
        description="classification scoring: run each prompt once and continue its KV cache "
        "with every choice (shared_prompt), or one full sequence per choice (full, the slower "
        "path kept for comparison); both give the same losses",
    )
    base_model: bool = Field(
        False,
        description="also score the frozen base model (no adapter) on every client's test split "
        "and show it beside the personalised scores (in-process runs)",
    )


class OutputConfig(_Section):
    dir: Path = Path("runs/default")
    tracker: Literal["none", "tensorboard", "wandb", "mlflow"] = Field(
        "none", description="where metrics.jsonl is mirrored; wandb/mlflow need their extras"
    )
    tracker_project: str = Field(
        "fedamole", min_length=1, description="W&B project / MLflow experiment name"
    )


class Config(_Section):
    seed: int = 42
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    hmole: HMoLEConfig = Field(default_factory=HMoLEConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    rsea: RSEAConfig = Field(default_factory=RSEAConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _participants_exist(self) -> Config:
        count = self.federation.clients_per_round
        if isinstance(count, int) and count > self.federation.num_clients:
            raise ValueError(
                f"federation.clients_per_round={count} exceeds federation.num_clients="
                f"{self.federation.num_clients}; lower it or use a fraction such as 0.5"
            )
        return self

    @model_validator(mode="after")
    def _every_group_has_a_client(self) -> Config:
        if self.data.partition == "groups" and self.data.num_groups > self.federation.num_clients:
            raise ValueError(
                f"data.num_groups={self.data.num_groups} exceeds federation.num_clients="
                f"{self.federation.num_clients}: data.partition=groups needs a client per group"
            )
        return self

    @property
    def min_experts(self) -> int:
        return self.rsea.min_experts or self.hmole.top_k

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key and what to do."""


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists, so `2`, `0.5`, `true`, `[q_proj,v_proj]` all work."""
    return yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. federation.rounds=2")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (if given), apply `key=value` overrides, validate. Errors name the key."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(read_utf8(path)) or {}
        except TextFileError as exc:
            raise ConfigError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at top level")
        origin = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " + --set"
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None
