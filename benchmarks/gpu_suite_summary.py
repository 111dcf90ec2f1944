"""The summary of benchmarks/gpu_suite.sh: what ran where, how each stage ended, what it measured.

Reads what the stages left in OUT (stages.tsv, hmole_overhead.json, the comparison's folder) and
writes OUT/summary.json and OUT/summary.md; every figure in them comes from those files. A stage
that was cut or failed is reported as such, with the comparison's finished runs, so a partial
suite still says what it measured. Exits 1 unless every stage succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedamole.compare import run_dir_for
from fedamole.reporting import SUMMARY, RunDir

TIMEOUT_CODES = {124: "timed out", 137: "timed out (killed)"}
JsonDoc = dict[str, object]


@dataclass(frozen=True)
class Stage:
    name: str
    exit_status: int
    wall_s: int
    limit_s: int
    command: str

    @property
    def status(self) -> str:
        return "ok" if self.exit_status == 0 else TIMEOUT_CODES.get(self.exit_status, "failed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the suite's OUT folder")
    parser.add_argument("--smoke", choices=["0", "1"], required=True)
    parser.add_argument("--mps", required=True, help="how CUDA MPS was used, in words")
    parser.add_argument("--methods", required=True, help="the comparison's, comma-separated")
    parser.add_argument("--seeds", required=True, help="the comparison's, comma-separated")
    return parser.parse_args()


def read_stages(out: Path) -> list[Stage]:
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines() if line]
    return [Stage(name, int(rc), int(wall), int(limit), cmd) for name, rc, wall, limit, cmd in rows]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(out: Path, mps: str) -> JsonDoc:
    """GPU from the suite's nvidia-smi query (no CUDA context needed here), CPU, torch."""
    gpu = out / "gpu.txt"
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "gpu": gpu.read_text().strip() if gpu.is_file() else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_mps": mps,
    }


def read_json(path: Path) -> JsonDoc | None:
    return json.loads(path.read_text()) if path.is_file() else None


def comparison_runs(folder: Path, methods: list[str], seeds: list[int]) -> dict[str, list[str]]:
    """Each (method, seed) of the comparison as <method>/seed<k>, by whether it finished."""
    runs: dict[str, list[str]] = {"finished": [], "unfinished": []}
    for method in methods:
        for seed in seeds:
            kind = (
                "finished" if RunDir(run_dir_for(folder, method, seed)).finished else "unfinished"
            )
            runs[kind].append(f"{method}/seed{seed}")
    return runs


def summarise(out: Path, smoke: bool, mps: str, methods: list[str], seeds: list[int]) -> JsonDoc:
    compare = out / "compare"
    return {
        "smoke": smoke,
        "machine": describe_machine(out, mps),
        "stages": [{**asdict(s), "status": s.status} for s in read_stages(out)],
        "overhead": read_json(out / "hmole_overhead.json"),
        "comparison": {
            "folder": str(compare),
            "runs": comparison_runs(compare, methods, seeds),
            "summary": read_json(compare / SUMMARY),
        },
    }


def render_stages(stages: list[JsonDoc]) -> list[str]:
    lines = [
        "| stage | status | exit | wall (s) | limit (s) | command |",
        "|---|---|---|---|---|---|",
    ]
    for s in stages:
        lines.append(
            f"| {s['name']} | {s['status']} | {s['exit_status']} | {s['wall_s']} | "
            f"{s['limit_s']} | `{s['command']}` |"
        )
    return lines


def render_overhead(doc: JsonDoc | None) -> list[str]:
    if doc is None:
        return ["No figures: the stage did not finish (see overhead.log)."]
    lines = [f"Machine: {doc['machine']}", "", f"Settings: {doc['settings']}", ""]
    lines += ["| figure | hmole | lora | hmole/lora |", "|---|---|---|---|"]
    h, lo, ratios = doc["methods"]["hmole"], doc["methods"]["lora"], doc["ratios"]
    rows = [
        ("training step, median (ms)", "step_ms", "step_time", ".1f"),
        ("step process CPU time, median (ms)", "step_cpu_ms", "step_cpu_time", ".1f"),
        ("greedy generation 16 x 32 tokens (s)", "generation_s", "generation_time", ".3f"),
        ("aten ops per step", "aten_ops", "aten_ops", "d"),
    ]
    for label, key, ratio, fmt in rows:
        lines.append(f"| {label} | {h[key]:{fmt}} | {lo[key]:{fmt}} | {ratios[ratio]:.2f} |")
    memory = {
        m: (d["params_adam_bytes"] + d["step_peak_bytes"]) / 2**20 for m, d in (("h", h), ("l", lo))
    }
    lines.append(
        f"| params + Adam + step peak (MiB) | {memory['h']:.1f} | {memory['l']:.1f} | "
        f"{ratios['memory']:.2f} |"
    )
    return lines


def render_comparison(doc: JsonDoc) -> list[str]:
    runs = doc["runs"]
    lines = [
        f"Runs finished: {len(runs['finished'])} ({', '.join(runs['finished']) or 'none'}); "
        f"unfinished: {', '.join(runs['unfinished']) or 'none'}.",
        "",
    ]
    table = Path(doc["folder"]) / "table.md"
    if doc["summary"] is not None and table.is_file():
        return lines + [table.read_text().rstrip(), "", f"Full report: {doc['folder']}/report.md"]
    return lines + [
        "No comparison table: not every run finished (see compare.log). Rerun the suite with the same OUT to "
        "resume (finished runs are skipped, killed ones resume from their checkpoints)."
    ]


def render_markdown(doc: JsonDoc) -> str:
    machine = doc["machine"]
    title = "GPU suite, SMOKE=1 (CPU, tiny model)" if doc["smoke"] else "GPU suite"
    lines = [
        f"# {title}",
        "",
        f"- GPU: {machine['gpu'] or 'none'}; CUDA MPS: {machine['cuda_mps']}",
        f"- CPU: {machine['cpu']}; {machine['platform']}; Python {machine['python']}",
        f"- torch {machine['torch']} (CUDA {machine['torch_cuda']})",
        "",
        *render_stages(doc["stages"]),
        "",
        "## HMoLE vs PEFT LoRA (benchmarks/hmole_overhead.py)",
        "",
        *render_overhead(doc["overhead"]),
        "",
        "## Comparison (configs/gpu_suite.yaml)",
        "",
        *render_comparison(doc["comparison"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    doc = summarise(args.out, args.smoke == "1", args.mps, methods, seeds)
    (args.out / "summary.json").write_text(json.dumps(doc, indent=2))
    (args.out / "summary.md").write_text(render_markdown(doc))
    print(f"summary in {args.out}/summary.md")
    failed = [s["name"] for s in doc["stages"] if s["status"] != "ok"]
    if failed:
        raise SystemExit(f"stages not ok: {', '.join(failed)} (see their logs in {args.out})")


if __name__ == "__main__":
    main()
