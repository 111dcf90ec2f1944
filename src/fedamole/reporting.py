"""Run outputs: metrics.jsonl, per-round assignments, summary.json, client adapters and plots."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fedamole.checkpoint import atomic_write_text  # noqa: E402
from fedamole.federation.types import Architecture, StateDict  # noqa: E402

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PRIMARY = ("accuracy", "rougeL")


def primary_name(record: dict[str, Any]) -> str:
    """The metric model selection and summaries use: accuracy for classification, else ROUGE-L."""
    return next(m for m in PRIMARY if m in record)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite the whole (small) file atomically so a kill never leaves half a line."""
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in records))


def metric_records(
    round_idx: int, client_id: int, metrics: dict[str, float], bytes_up: int, bytes_down: int
) -> list[dict[str, Any]]:
    """One record per split (val, test) of one client in one round."""
    records = []
    for split in ("val", "test"):
        values = {
            k.removeprefix(f"{split}_"): v for k, v in metrics.items() if k.startswith(f"{split}_")
        }
        records.append(
            {
                "round": round_idx,
                "client": client_id,
                "split": split,
                **values,
                "train_loss": metrics.get("train_loss"),
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
            }
        )
    return records


def write_assignment(run_dir: Path, round_idx: int, architectures: list[Architecture]) -> None:
    folder = run_dir / "assignments"
    folder.mkdir(exist_ok=True)
    doc = {"round": round_idx, "clients": {str(c): arch for c, arch in enumerate(architectures)}}
    atomic_write_text(folder / f"round_{round_idx:03d}.json", json.dumps(doc, indent=1))


def summarise(records: list[dict[str, Any]], wall_time_s: float) -> dict[str, Any]:
    """Per-client and mean test metrics at the last round each client took part in and at its
    best-validation round (selection never looks at test). A client dropped from the final round
    (a deployment where its node was down) reports its latest round."""
    by_client: dict[int, dict[int, dict[str, dict]]] = {}
    for r in records:
        by_client.setdefault(r["client"], {}).setdefault(r["round"], {})[r["split"]] = r
    metric = primary_name(records[0])
    last_round = max(r["round"] for r in records)
    per_client: dict[str, Any] = {}
    for cid, rounds in sorted(by_client.items()):
        best = max(sorted(rounds), key=lambda k: rounds[k]["val"][metric])
        per_client[str(cid)] = {
            "last": _test_values(rounds[max(rounds)]["test"]) | {"round": max(rounds)},
            "selected": _test_values(rounds[best]["test"]) | {"round": best},
        }
    names = [
        k for k in per_client[next(iter(per_client))]["last"] if k not in ("num_examples", "round")
    ]
    return {
        "metric": metric,
        "rounds": last_round + 1,
        "mean": {
            which: {m: float(np.mean([c[which][m] for c in per_client.values()])) for m in names}
            for which in ("last", "selected")
        },
        "per_client": per_client,
        "total_bytes_up": sum(r["bytes_up"] for r in records if r["split"] == "test"),
        "total_bytes_down": sum(r["bytes_down"] for r in records if r["split"] == "test"),
        "wall_time_s": wall_time_s,
    }


_NOT_METRICS = {"round", "client", "split", "train_loss", "bytes_up", "bytes_down"}


def _test_values(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k not in _NOT_METRICS}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / SUMMARY, json.dumps(summary, indent=2))


def save_client_model(
    run_dir: Path, client_id: int, state: StateDict, json_name: str, doc: dict[str, Any]
) -> Path:
    """A client's personalised model: ``clients/<id>/adapter.safetensors`` plus a JSON (``doc``)
    that says how to rebuild it, each written atomically."""
    folder = run_dir / "clients" / str(client_id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "adapter.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(folder / "adapter.safetensors")
    atomic_write_text(folder / json_name, json.dumps(doc, indent=1))
    return folder


def save_client_adapter(
    run_dir: Path,
    client_id: int,
    state: StateDict,
    architecture: Architecture,
    info: dict[str, Any],
) -> Path:
    """A FedAMoLE client's adapter: safetensors weights + a JSON describing its architecture."""
    doc = {"client": client_id, "architecture": architecture, **info}
    return save_client_model(run_dir, client_id, state, "architecture.json", doc)


def _layer_of(module: str) -> int:
    match = re.search(r"\.(\d+)\.", module)
    return int(match.group(1)) if match else 0


def plot_run(
    run_dir: Path, records: list[dict[str, Any]], architectures: list[Architecture] | None
) -> None:
    """plots/metric_per_round.png, and plots/experts_heatmap.png for methods with experts."""
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    metric = primary_name(records[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test"), strict=True):
        for cid in sorted({r["client"] for r in records}):
            rows = sorted(
                (r for r in records if r["client"] == cid and r["split"] == split),
                key=lambda r: r["round"],
            )
            ax.plot(
                [r["round"] for r in rows],
                [r[metric] for r in rows],
                marker="o",
                label=f"client {cid}",
            )
        ax.set(title=f"{split} {metric}", xlabel="round")
    axes[0].set_ylabel(metric)
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "metric_per_round.png", dpi=100)
    plt.close(fig)
    if architectures:
        _plot_experts(folder / "experts_heatmap.png", architectures)


def _plot_experts(path: Path, architectures: list[Architecture]) -> None:
    """How many experts each client holds per layer: the heterogeneity RSEA produces."""
    layers = sorted({_layer_of(m) for m in architectures[0]})
    counts = np.zeros((len(architectures), len(layers)))
    for c, arch in enumerate(architectures):
        for module, experts in arch.items():
            counts[c, layers.index(_layer_of(module))] += len(experts)
    fig, ax = plt.subplots(figsize=(max(4, len(layers) * 0.35 + 2), len(architectures) * 0.5 + 1.5))
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set(
        xlabel="layer",
        ylabel="client",
        title="experts per client per layer (all adapted modules)",
        yticks=range(len(architectures)),
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
