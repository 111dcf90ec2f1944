"""Memory and speed of the frozen backbone at fp32 / bf16 / int8 / nf4 (issue 30): for each, the
backbone's stored bytes, the process's resident memory once it is loaded, the peak resident
memory while it trains FedAMoLE on it (peak reset after loading), and the median time of a training step (forward + backward + Adam on the
HMoLE adapters). Each arm runs in its own process, so peaks do not mix.

    python benchmarks/quantized_backbone.py [--model smollm2-135m] [--batch 4] [--seq 128]

Target (issue 30): NF4 weights at most 0.4x the fp32 backbone's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ARMS = {
    "fp32": ["model.dtype=float32", "model.quantization=none"],
    "bf16": ["model.dtype=bfloat16", "model.quantization=none"],
    "int8": ["model.dtype=float32", "model.quantization=int8"],
    "nf4": ["model.dtype=float32", "model.quantization=nf4"],
}


def stored_bytes(tensor) -> int:
    """Bytes a tensor really keeps: a bitsandbytes 4-bit weight's packed data plus its
    quantisation state, a torchao tensor's inner tensors, else numel x element size."""
    import torch

    state = getattr(tensor, "quant_state", None)
    if state is not None:
        extra = state.as_dict(packed=True).values()
        return tensor.data.nbytes + sum(v.nbytes for v in extra if torch.is_tensor(v))
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (
        torch.Tensor,
        torch.nn.Parameter,
    ):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def status_mib(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start VmHWM afresh (Linux: 5 > /proc/self/clear_refs), so the peak is the steps' own."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def run_arm(model_name: str, overrides: list[str], batch: int, seq: int, steps: int) -> dict:
    import torch

    from fedamole.config import load_config
    from fedamole.federation.training import train_steps
    from fedamole.methods.fedamole import FedAMoLE

    cfg = load_config(None, [f"model.name={model_name}", "model.device=cpu", *overrides])
    started = status_mib()
    handle, tokenizer = FedAMoLE().build(cfg)
    backbone = sum(stored_bytes(p) for p in handle.model.parameters() if not p.requires_grad)
    backbone += sum(stored_bytes(b) for b in handle.model.buffers())
    handle.set_architecture({m: [0, 1, 2] for m in handle.modules})
    loaded = status_mib()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, tokenizer.vocab_size - 1, (batch, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # a prompt half and a response half
    batch_dict = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    def batches():
        while True:
            yield batch_dict

    times = []
    reset_peak()
    for step in range(steps + 1):  # the first step warms up
        began = time.perf_counter()
        train_steps(handle.model, handle.trainable_parameters(), batches(), 1, 1e-4, cfg.optim)
        if step:
            times.append(time.perf_counter() - began)
    peak = status_mib("VmHWM")
    return {
        "backbone_mib": backbone / 2**20,
        "rss_before_mib": started,
        "rss_loaded_mib": loaded,
        "peak_rss_mib": peak,
        "step_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        result = run_arm(args.model, ARMS[args.arm], args.batch, args.seq, args.steps)
        print(json.dumps(result))
        return
    import torch

    print(
        f"{args.model}, FedAMoLE adapters (3 experts per module), batch {args.batch} x "
        f"{args.seq} tokens, median of {args.steps} steps after one warm-up; torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| backbone | stored bytes MiB | vs fp32 | RSS after load MiB | peak RSS in steps MiB | step s |"
    )
    print("|---|---|---|---|---|---|")
    fp32 = None
    for arm in args.arms.split(","):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--arm",
                arm,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"| {arm} | failed: {done.stderr.strip().splitlines()[-1]} |||||")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        fp32 = fp32 or (r["backbone_mib"] if arm == "fp32" else None)
        ratio = f"{r['backbone_mib'] / fp32:.2f}x" if fp32 else "-"
        print(
            f"| {arm} | {r['backbone_mib']:.1f} | {ratio} | {r['rss_loaded_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['step_s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
