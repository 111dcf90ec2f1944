"""The run directory's one owner: every file name, atomic writes, metric records, the summary and
the plots, and the tables a run prints. Nothing else in the package writes into a run directory.

```
runs/<name>/
  config.yaml                 the exact configuration
  method.json                 the method and the run's id
  metrics.jsonl               one object per round, client and split (val/test): metrics, train
                              loss, bytes up/down; and one per round with split "server": RSEA
                              diagnostics (FedAMoLE)
  example_scores.jsonl        per round, client and split: each example's scores (for intervals)
  assignments/round_NNN.json  which experts each client held in each module that round
  manifests/round_NNN.json    per client: every tensor it was sent and sent back (name, shape,
                              dtype, bytes, DP noise), totals equal to bytes_down / bytes_up
  checkpoint.safetensors      server state after the last complete round (atomic)
  summary.json                per-client and mean test metrics; total bytes; wall time
  clients/<id>/               the personalised model: adapter.safetensors + a JSON to rebuild it
  plots/                      metric_per_round.png, experts_heatmap.png, rsea_diagnostics.png
```
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.table import Table  # noqa: E402

from fedamole.checkpoint import (  # noqa: E402
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from fedamole.config import Config, load_config  # noqa: E402
from fedamole.device import resolve_device, resolve_dtype  # noqa: E402
from fedamole.errors import UserError
from fedamole.files import (  # noqa: E402
    TextFileError,
    atomic_save_tensors,
    atomic_write_text,
    read_utf8,
)
from fedamole.tracking import NullTracker, Tracker, make_tracker, round_scalars  # noqa: E402
from fedamole.types import (  # noqa: E402
    SPLIT_METRICS,
    Architecture,
    ExampleScores,
    Metrics,
    StateDict,
    of_split,
    primary_metric,
)

CONFIG_FILE = "config.yaml"
METHOD_FILE = "method.json"
METRICS = "metrics.jsonl"
EXAMPLE_SCORES = "example_scores.jsonl"
SUMMARY = "summary.json"
LOCK_FILE = ".lock"  # held (flock) by the one process writing the run
CHECKPOINT = "checkpoint.safetensors"
ASSIGNMENTS = "assignments"
MANIFESTS = "manifests"
CLIENTS = "clients"
PLOTS = "plots"
ADAPTER_WEIGHTS = "adapter.safetensors"
SPLITS = ("val", "test")
SERVER = "server"  # the split of the per-round server record (diagnostics)

Record = dict[str, Any]


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked; nothing in it was touched."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_jsonl(path: Path) -> list[Record]:
    """Every complete line; a last line without its newline is an append a kill cut short.
    Anything else unreadable is damage, named by file and line."""
    if not path.exists():
        return []
    try:
        complete = read_utf8(path).split("\n")[:-1]
    except TextFileError as exc:
        raise RunDirError(f"damaged: {exc}") from None
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunDirError(
                f"{path}, line {number}: damaged ({exc.msg}); restore the file from a copy"
            ) from None
    return records


def _lines(records: Iterable[Record]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _append_jsonl(path: Path, records: Iterable[Record]) -> None:
    """Add one round's rows at the end, so a round costs its own rows, not the whole run's."""
    with path.open("a") as file:
        file.write(_lines(records))


class RunDir:
    """One run's directory. Open it with :meth:`open`, which checks it before anything expensive
    runs: a new run never overwrites anything, a resumed one must have the same config and method.
    Every metric record also goes to the configured tracker (``output.tracker``)."""

    def __init__(self, path: Path, tracker: Tracker | None = None) -> None:
        self.path = Path(path)
        self.tracker = tracker or NullTracker()
        self._lock_handle: TextIO | None = None

    # ------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, cfg: Config, method: str, resume: bool) -> RunDir:
        """The run directory, checked and locked for this process: the only writer until it
        :meth:`release` s it or exits."""
        run_dir = cls(cfg.output.dir, make_tracker(cfg.output))
        if resume:
            run_dir._check_resumable(cfg, method)
        else:
            run_dir._check_new()
        run_dir._lock()
        if not resume:
            run_dir._check_new()  # again, now that no one else can be starting it
        return run_dir

    def _check_new(self) -> None:
        if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise RunDirError(
                f"run directory {self.path} already exists and is not empty; pass --resume to "
                "continue it, or choose another --out"
            )

    def _lock(self) -> None:
        """An exclusive lock on ``.lock`` (``flock``: the kernel drops it when the process ends,
        however it ends), naming its holder, so a second writer is refused instead of
        interleaving its rows with the first's."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = (self.path / LOCK_FILE).open("a+")
        except OSError as exc:
            raise RunDirError(
                f"cannot write into {self.path} ({exc.strerror}); choose a writable --out"
            ) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"run directory {self.path} is being written by {holder}; two writers would "
                "corrupt its records: wait for that run to end or stop it, then --resume"
            ) from None
        handle.truncate(0)
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock_handle = handle

    def release(self) -> None:
        """Give up the lock (the run is done with the directory, or failed)."""
        handle, self._lock_handle = self._lock_handle, None
        if handle is not None:
            handle.close()

    def _check_resumable(self, cfg: Config, method: str) -> None:
        saved_file = self.path / CONFIG_FILE
        if not saved_file.is_file():
            raise RunDirError(f"--resume: {saved_file} not found; is {self.path} a fedamole run?")
        saved = _flatten(load_config(saved_file).model_dump(mode="json"))
        ours = _flatten(cfg.model_dump(mode="json"))
        where = {"output.dir"}  # a run resumes from wherever it now lies, however it is spelled
        keys = (ours.keys() | saved.keys()) - where
        differing = sorted(k for k in keys if ours.get(k) != saved.get(k))
        if differing:
            raise RunDirError(
                f"--resume: settings differ from the run's {CONFIG_FILE}: {', '.join(differing)}; "
                "resume with the same configuration"
            )
        if self.method != method:
            raise RunDirError(
                f"--resume: {self.path} is a {self.method!r} run, not {method!r}; resume it with "
                "its method"
            )
        self._check_resume_point()

    def _check_resume_point(self) -> None:
        """The checkpoint is whole, or missing only because no round finished: records of a
        later round without it mean it was lost, and resuming would retrain over them."""
        if self.finished:
            raise RunDirError(
                f"--resume: {self.path} is a finished run (its {SUMMARY} is written); nothing is "
                "retrained: its results stay as they are. Choose another --out for a new run"
            )
        recorded = [r["round"] for r in self.read_records() if isinstance(r.get("round"), int)]
        self.read_example_scores()  # readable too, before anything is rewound
        if self.has_checkpoint:
            try:
                verify_checkpoint(self.path / CHECKPOINT)
            except CheckpointError as exc:
                raise RunDirError(f"--resume: {exc}") from None
            return
        if recorded and max(recorded) >= 1:
            raise RunDirError(
                f"--resume: {self.path} has records through round {max(recorded)} but no "
                f"{CHECKPOINT}; resuming would retrain from round 0 and replace them. Restore the "
                "checkpoint from a copy, or start a new run in another folder"
            )

    def start(self, cfg: Config, method: str) -> None:
        """A new run: the exact config and the method, with a fresh run id, and the backbone
        dtype ``model.dtype`` resolves to here and why (on Flower: the server's machine; each
        node logs its own)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG_FILE, cfg.to_yaml())
        dtype, why = resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))
        doc = {"method": method, "run_id": uuid.uuid4().hex, "backbone_dtype": [dtype, why]}
        atomic_write_text(self.path / METHOD_FILE, json.dumps(doc))

    @property
    def method(self) -> str:
        return self._method_doc()["method"]

    @property
    def run_id(self) -> str:
        """Stable across resumes: clients on other machines key their private state by it."""
        return self._method_doc().get("run_id", self.path.resolve().name)

    def _method_doc(self) -> dict[str, Any]:
        path = self.path / METHOD_FILE
        if not path.is_file():
            raise RunDirError(f"{path} not found; is {self.path} a fedamole run?")
        return json.loads(path.read_text())

    def config(self) -> Config:
        return load_config(self.path / CONFIG_FILE)

    # ------------------------------------------------------------------------------ checkpoint
    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        write_checkpoint(self.path / CHECKPOINT, checkpoint)

    def load_checkpoint(self) -> Checkpoint:
        return read_checkpoint(self.path / CHECKPOINT)

    # ------------------------------------------------------------------------------ records
    def read_records(self) -> list[Record]:
        return _read_jsonl(self.path / METRICS)

    def read_example_scores(self) -> list[Record]:
        return _read_jsonl(self.path / EXAMPLE_SCORES)

    def append_round(self, records: list[Record], example_scores: list[Record]) -> None:
        """One round's metric records and example scores (before its checkpoint is saved)."""
        _append_jsonl(self.path / METRICS, records)
        _append_jsonl(self.path / EXAMPLE_SCORES, example_scores)

    def rewind(self, round_idx: int) -> None:
        """Keep the rows of the rounds before ``round_idx`` only: a resumed run drops what a
        killed round wrote after the last checkpoint (rewritten atomically, once)."""
        for name in (METRICS, EXAMPLE_SCORES):
            rows = _before(_read_jsonl(self.path / name), round_idx)
            atomic_write_text(self.path / name, _lines(rows))

    def start_tracking(self, cfg: Config, name: str, resume_round: int | None) -> None:
        """Open the tracker run (a resumed run continues the same one from ``resume_round``)."""
        self.tracker.start(self.path, name, cfg.model_dump(mode="json"), resume_round)

    def track_round(self, round_idx: int, records: list[Record]) -> None:
        """One round's records to the tracker: per client and mean, and the server's."""
        clients = [r for r in records if r["split"] in SPLITS]
        scalars = round_scalars(clients) if clients else {}
        for record in records:
            if record["split"] == SERVER:
                scalars |= {
                    f"server/{k}": v for k, v in record.items() if k not in ("round", "split")
                }
        self.tracker.log(scalars, step=round_idx)

    def finish_tracking(self) -> None:
        self.tracker.finish()

    def write_assignment(self, round_idx: int, architectures: Mapping[int, Architecture]) -> None:
        folder = self.path / ASSIGNMENTS
        folder.mkdir(exist_ok=True)
        doc = {"round": round_idx, "clients": {str(c): a for c, a in sorted(architectures.items())}}
        atomic_write_text(folder / f"round_{round_idx:03d}.json", json.dumps(doc, indent=1))

    def write_manifest(self, round_idx: int, clients: Mapping[str, Any]) -> None:
        """``manifests/round_NNN.json``: what each client was sent and sent back this round."""
        folder = self.path / MANIFESTS
        folder.mkdir(exist_ok=True)
        doc = {"round": round_idx, "clients": dict(clients)}
        atomic_write_text(folder / f"round_{round_idx:03d}.json", json.dumps(doc, indent=1))

    def latest_architectures(self) -> dict[int, Architecture]:
        """Each client's architecture in the latest round it took part in ({} without experts)."""
        latest: dict[int, Architecture] = {}
        for file in sorted((self.path / ASSIGNMENTS).glob("round_*.json")):
            for client, arch in json.loads(file.read_text())["clients"].items():
                latest[int(client)] = arch
        return latest

    # ------------------------------------------------------------------------------ client models
    def client_folder(self, client_id: int) -> Path:
        return self.path / CLIENTS / str(client_id)

    def save_client_model(
        self, client_id: int, weights: StateDict | None, json_name: str, doc: dict[str, Any]
    ) -> Path:
        """``clients/<id>/adapter.safetensors`` and a JSON that says how to rebuild it; without
        weights (a model that stays on the client's node) only the JSON, saying so."""
        folder = self.client_folder(client_id)
        folder.mkdir(parents=True, exist_ok=True)
        if weights is not None:
            atomic_save_tensors(folder / ADAPTER_WEIGHTS, weights)
        atomic_write_text(folder / json_name, json.dumps(doc, indent=1))
        return folder

    # ------------------------------------------------------------------------------ summary
    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / SUMMARY).read_text())

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    def check_finished(self) -> None:
        """A run whose client models can be read: it exists, is a fedamole run, and finished."""
        if not self.path.is_dir():
            raise RunDirError(f"--run {self.path}: no such directory")
        method = self.method  # names a folder that is no run
        if not self.finished:
            raise RunDirError(
                f"run {self.path} is not finished (no {SUMMARY}): client models are saved after "
                f"its last round; finish it with `fedamole run --config {self.path}/{CONFIG_FILE} "
                f"--method {method} --resume --out {self.path}`"
            )

    def write_plots(self, records: list[Record], architectures: Mapping[int, Architecture]) -> None:
        folder = self.path / PLOTS
        folder.mkdir(exist_ok=True)
        plot_metric_per_round(folder / "metric_per_round.png", records)
        if architectures:
            plot_experts(folder / "experts_heatmap.png", architectures)
        server = [r for r in records if r["split"] == SERVER]
        if server:
            plot_diagnostics(folder / "rsea_diagnostics.png", server)


def _before(records: list[Record], round_idx: int) -> list[Record]:
    return [r for r in records if r["round"] < round_idx]


# ---------------------------------------------------------------------------------- records
def metric_records(
    round_idx: int, client_id: int, metrics: Metrics, bytes_up: int, bytes_down: int
) -> list[Record]:
    """One record per split (val, test) of one client in one round; the round's own metrics
    (train_loss, embedding norms) and bytes repeat in both."""
    own = {k: v for k, v in metrics.items() if not k.startswith(tuple(f"{s}_" for s in SPLITS))}
    return [
        {
            "round": round_idx,
            "client": client_id,
            "split": split,
            **of_split(metrics, split),
            "train_loss": metrics.get("train_loss"),
            **own,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        for split in SPLITS
    ]


def server_record(round_idx: int, diagnostics: Metrics) -> list[Record]:
    """The round's server-side diagnostics as one record (none when there are none)."""
    return [{"round": round_idx, "split": SERVER, **diagnostics}] if diagnostics else []


def example_score_rows(round_idx: int, client_id: int, scores: ExampleScores) -> list[Record]:
    """One row per split with each metric's per-example values."""
    rows = []
    for split in SPLITS:
        values = of_split(scores, split)
        if values:
            rows.append({"round": round_idx, "client": client_id, "split": split, **values})
    return rows


def _test_values(record: Record) -> dict[str, float]:
    return {k: v for k, v in record.items() if k in SPLIT_METRICS}


def _latest_best(rounds: Mapping[int, float]) -> int:
    """The round with the highest value; ties go to the latest round (the model trained longest)."""
    return max(rounds, key=lambda r: (rounds[r], r))


def summarise(records: list[Record], wall_time_s: float) -> dict[str, Any]:
    """Per-client and mean test metrics at the last round each client took part in and at its
    validation-selected round, and at the single round with the best mean validation score
    (selection never looks at test; ties go to the latest round). A client that missed rounds
    (sampling, drop-outs) reports its latest round and how many rounds it took part in."""
    evaluated = [r for r in records if r["split"] in SPLITS]
    by_client: dict[int, dict[int, dict[str, Record]]] = {}
    for r in evaluated:
        by_client.setdefault(r["client"], {}).setdefault(r["round"], {})[r["split"]] = r
    metric = primary_metric(evaluated[0])
    per_client: dict[str, Any] = {}
    for cid, rounds in sorted(by_client.items()):
        best = _latest_best({k: v["val"][metric] for k, v in rounds.items()})
        per_client[str(cid)] = {
            "last": _test_values(rounds[max(rounds)]["test"]) | {"round": max(rounds)},
            "selected": _test_values(rounds[best]["test"]) | {"round": best},
            "rounds": len(rounds),
        }
    names = [
        k for k in next(iter(per_client.values()))["last"] if k not in ("num_examples", "round")
    ]
    return {
        "metric": metric,
        "rounds": max(r["round"] for r in evaluated) + 1,
        "mean": {
            which: {m: float(np.mean([c[which][m] for c in per_client.values()])) for m in names}
            for which in ("last", "selected")
        },
        "best_round": _best_mean_round(evaluated, metric, names),
        "per_client": per_client,
        "total_bytes_up": sum(r["bytes_up"] for r in evaluated if r["split"] == "test"),
        "total_bytes_down": sum(r["bytes_down"] for r in evaluated if r["split"] == "test"),
        "wall_time_s": wall_time_s,
    }


def _best_mean_round(records: list[Record], metric: str, names: list[str]) -> dict[str, Any]:
    """The one round whose mean validation score over its clients is highest, and its mean test
    metrics: one model-selection decision for everybody instead of one per client."""
    val = {
        rnd: float(
            np.mean([r[metric] for r in records if r["round"] == rnd and r["split"] == "val"])
        )
        for rnd in sorted({r["round"] for r in records})
    }
    best = _latest_best(val)
    tests = [r for r in records if r["round"] == best and r["split"] == "test"]
    return {"round": best, "val": val[best]} | {
        m: float(np.mean([r[m] for r in tests])) for m in names
    }


# ---------------------------------------------------------------------------------- plots
def _layer_of(module: str) -> int:
    match = re.search(r"\.(\d+)\.", module)
    return int(match.group(1)) if match else 0


def plot_metric_per_round(path: Path, records: list[Record]) -> None:
    """Every client's primary metric per round, validation and test side by side."""
    evaluated = [r for r in records if r["split"] in SPLITS]
    metric = primary_metric(evaluated[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, SPLITS, strict=True):
        for cid in sorted({r["client"] for r in evaluated}):
            rows = sorted(
                (r for r in evaluated if r["client"] == cid and r["split"] == split),
                key=lambda r: r["round"],
            )
            ax.plot(
                [r["round"] for r in rows],
                [r[metric] for r in rows],
                marker="o",
                label=f"client {cid}",
            )
        ax.set(title=f"{split} {metric}", xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(metric)
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_experts(path: Path, architectures: Mapping[int, Architecture]) -> None:
    """How many experts each client holds per layer: the heterogeneity RSEA produces."""
    clients = sorted(architectures)
    layers = sorted({_layer_of(m) for m in architectures[clients[0]]})
    counts = np.zeros((len(clients), len(layers)))
    for row, c in enumerate(clients):
        for module, experts in architectures[c].items():
            counts[row, layers.index(_layer_of(module))] += len(experts)
    fig, ax = plt.subplots(figsize=(max(4, len(layers) * 0.35 + 2), len(clients) * 0.5 + 1.5))
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set(
        xlabel="layer",
        ylabel="client",
        title="experts per client per layer (all adapted modules)",
        yticks=range(len(clients)),
        yticklabels=[str(c) for c in clients],
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_diagnostics(path: Path, server: list[Record]) -> None:
    """Each recorded RSEA diagnostic per round, one panel each."""
    names = sorted({k for r in server for k in r} - {"round", "split"})
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in server if name in r]
        ax.plot([r["round"] for r in rows], [r[name] for r in rows], marker="o")
        ax.set_title(name.removeprefix("rsea_"), fontsize="small")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- tables
def round_table(round_idx: int, metrics: dict[int, Metrics]) -> Table:
    table = Table(title=f"round {round_idx}")
    first = next(iter(metrics.values()))
    names = sorted(k for k in first if k.startswith(("val_", "test_")) and "num_examples" not in k)
    for column in ("client", "train_loss", *names):
        table.add_column(column, justify="right")
    for client, values in metrics.items():
        table.add_row(
            str(client),
            f"{values.get('train_loss', float('nan')):.3f}",
            *(f"{values.get(n, float('nan')):.3f}" for n in names),
        )
    return table


def summary_table(summary: dict[str, Any]) -> Table:
    metric = summary["metric"]
    base = summary.get("base_model", {})
    table = Table(title=f"final per-client test {metric} (last round / validation-selected round)")
    columns = ["client", "last", "selected", "selected round"]
    for column in columns + (["base model", "selected - base"] if base else []):
        table.add_column(column, justify="right")
    for cid, values in summary["per_client"].items():
        selected = values["selected"][metric]
        cells = [cid, f"{values['last'][metric]:.4f}", f"{selected:.4f}"]
        cells.append(str(values["selected"]["round"]))
        if base:
            cells += [f"{base[cid][metric]:.4f}", f"{selected - base[cid][metric]:+.4f}"]
        table.add_row(*cells)
    mean = summary["mean"]["selected"][metric]
    cells = ["mean", f"{summary['mean']['last'][metric]:.4f}", f"{mean:.4f}", ""]
    if base:
        base_mean = sum(b[metric] for b in base.values()) / len(base)
        cells += [f"{base_mean:.4f}", f"{mean - base_mean:+.4f}"]
    table.add_row(*cells)
    best = summary["best_round"]
    table.add_row(f"best mean-val round {best['round']}", "", f"{best[metric]:.4f}", "")
    return table
