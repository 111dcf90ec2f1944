"""Training-step overhead of HMoLE over a single PEFT LoRA of the same rank on the same targets.

Default model (SmolLM2-135M) on CPU, fp32, batch 4 x 128 tokens, r = 8, q/v targets,
6 local experts, top-2. Prints the median step time (forward + backward + Adam step) of each and,
as its last line, `hmole/lora step time ratio: X.XX` (target <= 1.30).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from fedamole.hmole import inject_hmole
from fedamole.models import load_base_model


def _step_timer(model: torch.nn.Module, params: list[torch.nn.Parameter], batch: dict, extra_loss):
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        loss = model(**batch).loss + extra_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--experts", type=int, default=6)
    args = parser.parse_args()

    torch.manual_seed(0)
    base, _ = load_base_model(args.model)
    lora_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
    )
    adapter = inject_hmole(base, ["q_proj", "v_proj"], rank=8, alpha=16, dropout=0.05, top_k=2)
    adapter.set_architecture({m: list(range(args.experts)) for m in adapter.modules})
    for model in (base, lora_model):
        model.train()

    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    lora_params = [p for p in lora_model.parameters() if p.requires_grad]
    timers = {
        "hmole": _step_timer(
            base, adapter.trainable_parameters(), batch, adapter.load_balancing_loss
        ),
        "lora": _step_timer(lora_model, lora_params, batch, lambda: 0.0),
    }
    times: dict[str, list[float]] = {name: [] for name in timers}
    for i in range(args.warmup + args.steps):  # interleave so drift hits both alike
        for name, step in timers.items():
            elapsed = step()
            if i >= args.warmup:
                times[name].append(elapsed)

    print(
        f"machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"settings: model={args.model} fp32 batch={args.batch}x{args.seq} r=8 targets=q_proj,v_proj "
        f"experts={args.experts} top_k=2 steps={args.steps} (+{args.warmup} warm-up)"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(
            f"{name:>5}: median step {median * 1000:.0f} ms "
            f"(min {min(times[name]) * 1000:.0f}, max {max(times[name]) * 1000:.0f})"
        )
    print(f"hmole/lora step time ratio: {medians['hmole'] / medians['lora']:.2f}")


if __name__ == "__main__":
    main()
