"""Cost of HMoLE over a single PEFT LoRA of the same rank on the same targets.

Default: SmolLM2-135M on CPU, fp32, batch 4 x 128 tokens, r = 8 on q/v, 6 local experts, top-2.
Both methods get the same batch and the training step of the shared loop
(fedamole.federation.training.train_steps: Adam with the same lr, weight decay and foreach
default, gradient clipping, lambda_lb for HMoLE's load-balancing loss). Prints

  (a) the median training-step time of each and their ratio (synchronised on CUDA), and the
      median process CPU time per step as a cross-check on a shared machine,
  (b) the time of greedy generation, 16 prompts x 32 new tokens with the KV cache,
  (c) the aten operations dispatched in one training step (forward, backward, clipping,
      optimizer step), counted exactly with a TorchDispatchMode,
  (d) memory: adapter parameters + Adam state, plus the step's own peak (CUDA: the allocator's
      peak above what was allocated before the step; CPU: the tensors saved for backward,
      parameters excluded, each storage counted once),

and, as its last line, `hmole/lora step time ratio: X.XX`. `--json PATH` also writes these
figures (machine, settings, per method, ratios) as JSON, for benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from fedamole.config import HMoLEConfig, OptimConfig
from fedamole.device import AUTOCAST_DTYPES, DTYPES, DeviceError, autocast, resolve_device
from fedamole.hmole import inject_hmole
from fedamole.models import DEFAULT_MODEL, TINY_MODEL, load_base_model, model_cache_dir

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 16, 32, 32
Batch = dict[str, Tensor]
Figures = dict[str, float]  # one method's medians, op counts and bytes


@dataclass
class Method:
    name: str
    model: PreTrainedModel
    params: list[nn.Parameter]
    aux_loss: Callable[[], Tensor] | None
    optimizer: torch.optim.Optimizer | None = None


# ----------------------------------------------------------------------------- setup
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--mixed-precision", default="no", choices=["no", *AUTOCAST_DTYPES])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--experts", type=int, default=6, help="local experts per module")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generations per method")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from its config without loading weights (timing needs none)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args()


def smollm2_config() -> LlamaConfig:
    """The cached model's config when there is one, else SmolLM2-135M's architecture."""
    cached = sorted(model_cache_dir().glob("SmolLM2-135M*/config.json"))
    if cached:
        return AutoConfig.from_pretrained(cached[0].parent)
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build_base(name: str, random_weights: bool, dtype: torch.dtype) -> PreTrainedModel:
    if not random_weights or name == TINY_MODEL:
        model = load_base_model(name)[0]
    else:
        config = smollm2_config() if name == DEFAULT_MODEL else AutoConfig.from_pretrained(name)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    return model.to(dtype)


def build_methods(base: PreTrainedModel, hmole: HMoLEConfig, experts: int) -> list[Method]:
    lora_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=hmole.rank,
            lora_alpha=hmole.alpha,
            lora_dropout=hmole.dropout,
            target_modules=hmole.target_modules,
        ),
    )
    adapter = inject_hmole(
        base, hmole.target_modules, hmole.rank, hmole.alpha, hmole.dropout, hmole.top_k
    )
    adapter.set_architecture({m: list(range(experts)) for m in adapter.modules})
    lora_params = [p for p in lora_model.parameters() if p.requires_grad]
    return [
        Method("hmole", base, adapter.trainable_parameters(), adapter.load_balancing_loss),
        Method("lora", lora_model, lora_params, None),
    ]


# ----------------------------------------------------------------------------- measurements
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(method: Method, batch: Batch, optim: OptimConfig) -> None:
    """One step of fedamole.federation.training.train_steps, mirrored line by line (same Adam
    construction, clipping and auxiliary loss) so the two methods can be interleaved."""
    if method.optimizer is None:
        method.optimizer = torch.optim.Adam(
            method.params, lr=optim.lr, weight_decay=optim.weight_decay
        )
    method.model.train()
    lm_loss = method.model(**batch).loss
    loss = lm_loss + optim.lb_weight * method.aux_loss() if method.aux_loss else lm_loss
    loss.backward()
    if optim.grad_clip is not None:
        nn.utils.clip_grad_norm_(method.params, optim.grad_clip)
    method.optimizer.step()
    method.optimizer.zero_grad(set_to_none=True)
    lm_loss.item()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU time of ``fn`` (on CUDA the latter is only the host's share)."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


class OpCounter(TorchDispatchMode):
    """Counts every aten op that reaches the dispatcher; views separately (no kernel on GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], None]) -> OpCounter:
    with OpCounter() as counter:
        step()
    return counter


@contextlib.contextmanager
def saved_activation_bytes(params: set[int]) -> Iterator[list[int]]:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    seen: set[int] = set()
    total = [0]

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and storage.nbytes() > 0:
            seen.add(key)
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def step_memory(method: Method, step: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    params = {p.untyped_storage().data_ptr() for p in method.model.parameters()}
    with saved_activation_bytes(params) as total:
        step()
    return total[0]


def adapter_state_bytes(method: Method) -> int:
    """Trainable parameters plus the Adam state held for them."""
    state_bytes = sum(
        t.nbytes
        for state in method.optimizer.state.values()
        for t in state.values()
        if isinstance(t, Tensor)
    )
    return sum(p.nbytes for p in method.params) + state_bytes


def generation_prompts(vocab: int, device: torch.device) -> Batch:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (PROMPTS, PROMPT_TOKENS), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def generate(method: Method, prompts: Batch) -> Tensor:
    method.model.eval()
    with torch.no_grad():
        return method.model.generate(
            **prompts,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,  # no early stop: both produce every token
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )


# ----------------------------------------------------------------------------- report
def describe_machine(device: torch.device) -> str:
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    )
    return (
        f"{platform.platform()}; {device} ({where}); torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    args = parse_args()
    try:
        device = resolve_device(args.device)
    except DeviceError as err:
        raise SystemExit(str(err).replace("model.device", "--device")) from None
    hmole, optim = HMoLEConfig(), OptimConfig()
    base = build_base(args.model, args.random_weights, DTYPES[args.dtype]).to(device)
    methods = build_methods(base, hmole, args.experts)

    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    prompts = generation_prompts(base.config.vocab_size, device)

    def step_of(method: Method) -> Callable[[], None]:
        def step() -> None:
            with autocast(device, args.mixed_precision):
                train_step(method, batch, optim)

        return step

    times: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu_times: dict[str, list[float]] = {m.name: [] for m in methods}
    for i in range(args.warmup + args.steps):  # interleaved, so drift hits both alike
        for method in methods:
            elapsed, cpu = timed(step_of(method), device)
            if i >= args.warmup:
                times[method.name].append(elapsed)
                cpu_times[method.name].append(cpu)
    ops = {m.name: count_ops(step_of(m)) for m in methods}
    memory = {m.name: (adapter_state_bytes(m), step_memory(m, step_of(m), device)) for m in methods}

    gen_times: dict[str, list[float]] = {m.name: [] for m in methods}
    for i in range(1 + args.gen_repeats):  # the first run of each warms up
        for method in methods:
            with autocast(device, args.mixed_precision):
                elapsed, _ = timed(lambda m=method: generate(m, prompts), device)
            if i > 0:
                gen_times[method.name].append(elapsed)

    per_method = method_figures(times, cpu_times, gen_times, ops, memory)
    ratios = hmole_lora_ratios(per_method["hmole"], per_method["lora"])
    settings = (
        f"model={args.model}{' (random weights)' if args.random_weights else ''} "
        f"dtype={args.dtype} mixed-precision={args.mixed_precision} "
        f"batch={args.batch}x{args.seq} r={hmole.rank} targets={','.join(hmole.target_modules)} "
        f"experts={args.experts} top_k={hmole.top_k} dropout={hmole.dropout} "
        f"Adam lr={optim.lr} grad_clip={optim.grad_clip} steps={args.steps} (+{args.warmup} warm-up)"
    )
    print_report(describe_machine(device), settings, per_method, ratios, device)
    if args.json:
        doc = {
            "machine": describe_machine(device),
            "settings": settings,
            "methods": per_method,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(doc, indent=2))


def method_figures(
    times: dict[str, list[float]],
    cpu_times: dict[str, list[float]],
    gen_times: dict[str, list[float]],
    ops: dict[str, OpCounter],
    memory: dict[str, tuple[int, int]],
) -> dict[str, Figures]:
    """Per method: median step and generation times, aten ops per step, memory."""
    return {
        name: {
            "step_ms": statistics.median(times[name]) * 1000,
            "step_min_ms": min(times[name]) * 1000,
            "step_max_ms": max(times[name]) * 1000,
            "step_cpu_ms": statistics.median(cpu_times[name]) * 1000,
            "generation_s": statistics.median(gen_times[name]),
            "aten_ops": ops[name].total,
            "non_view_ops": ops[name].total - ops[name].views,
            "params_adam_bytes": memory[name][0],
            "step_peak_bytes": memory[name][1],
        }
        for name in times
    }


def hmole_lora_ratios(h: Figures, lo: Figures) -> dict[str, float]:
    return {
        "aten_ops": h["aten_ops"] / lo["aten_ops"],
        "non_view_ops": h["non_view_ops"] / lo["non_view_ops"],
        "memory": (h["params_adam_bytes"] + h["step_peak_bytes"])
        / (lo["params_adam_bytes"] + lo["step_peak_bytes"]),
        "step_cpu_time": h["step_cpu_ms"] / lo["step_cpu_ms"],
        "generation_time": h["generation_s"] / lo["generation_s"],
        "step_time": h["step_ms"] / lo["step_ms"],
    }


def print_report(
    machine: str,
    settings: str,
    per_method: dict[str, Figures],
    ratios: dict[str, float],
    device: torch.device,
) -> None:
    print(f"machine: {machine}")
    print(f"settings: {settings}")
    for name, m in per_method.items():
        print(
            f"{name:>5}: step median {m['step_ms']:.0f} ms "
            f"(min {m['step_min_ms']:.0f}, max {m['step_max_ms']:.0f}; "
            f"process CPU time {m['step_cpu_ms']:.0f}); "
            f"generation {m['generation_s']:.2f} s; "
            f"aten ops/step {m['aten_ops']} ({m['non_view_ops']} non-view); "
            f"memory: params+Adam {mib(m['params_adam_bytes'])}, "
            f"step peak {mib(m['step_peak_bytes'])}"
        )
    memory_kind = (
        "CUDA allocator peak above the memory allocated before the step"
        if device.type == "cuda"
        else "tensors saved for backward (activations), parameters excluded"
    )
    print(f"step peak memory = {memory_kind}")
    r = ratios
    print(
        f"hmole/lora aten ops per step ratio: {r['aten_ops']:.2f} "
        f"(non-view: {r['non_view_ops']:.2f})"
    )
    print(f"hmole/lora memory ratio (params+Adam+step peak): {r['memory']:.2f}")
    print(f"hmole/lora step process-CPU-time ratio: {r['step_cpu_time']:.2f}")
    print(f"hmole/lora generation time ratio: {r['generation_time']:.2f}")
    print(f"hmole/lora step time ratio: {r['step_time']:.2f}")


if __name__ == "__main__":
    main()
