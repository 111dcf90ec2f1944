"""Experiment tracking: every metric written to metrics.jsonl also goes to a tracker.

`output.tracker` picks one: `none` (default), `tensorboard` (a dependency, so it works out of
the box; event files in ``<run_dir>/tensorboard/``), `wandb` or `mlflow` (optional extras:
``pip install 'fedamole[wandb]'`` / ``'fedamole[mlflow]'``). `make_tracker` imports the package
at once, so a missing one fails before any model loads. Each round's per-client records become
scalars ``client<id>/<split>_<metric>`` and ``mean/<split>_<metric>`` at step = round (fields
that belong to the client's round rather than a split, such as train_loss and bytes, drop the
split); the run config goes along as text (TensorBoard), run config (W&B) or config.json
artifact (MLflow).

W&B and MLflow are configured the usual way, by their own environment variables and logins:
``WANDB_MODE=offline`` logs without network (``wandb sync`` uploads later) and
``MLFLOW_TRACKING_URI`` picks the MLflow server or store. A resumed run continues the same
tracker run: TensorBoard drops the points at and after the resumed round, W&B and MLflow reopen
the run whose id ``<run_dir>/tracker_run.json`` keeps.
"""

from __future__ import annotations

import importlib
import json
import numbers
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import fmean
from types import ModuleType
from typing import Protocol

import yaml

from fedamole.config import ConfigError, OutputConfig
from fedamole.files import atomic_write_text
from fedamole.types import SPLIT_METRICS

TENSORBOARD_DIR = "tensorboard"
RUN_ID_FILE = "tracker_run.json"

RunConfig = Mapping[str, object]
"""The run's configuration as plain data (`Config.model_dump(mode="json")`)."""

MetricRecord = Mapping[str, object]
"""One line of metrics.jsonl: round, client, split and that split's metrics."""


class Tracker(Protocol):
    """Where a run's metrics go besides metrics.jsonl: start once, log each round, finish."""

    def start(
        self, run_dir: Path, run_name: str, config: RunConfig, resume_round: int | None = None
    ) -> None:
        """Open the tracker run; `resume_round` is the first round a resumed run logs again
        (None for a fresh run)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """`output.tracker: none`: metrics.jsonl only."""

    def start(
        self, run_dir: Path, run_name: str, config: RunConfig, resume_round: int | None = None
    ) -> None:
        pass

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class TensorBoardTracker:
    """Event files in ``<run_dir>/tensorboard/``; a resumed run appends to the same folder and
    purges the points from the resumed round on, so no round appears twice."""

    def __init__(self) -> None:
        _import_for("tensorboard", "tensorboard", "pip install tensorboard")
        self._writer = None

    def start(
        self, run_dir: Path, run_name: str, config: RunConfig, resume_round: int | None = None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_round)
        self._writer.add_text("config", _config_markdown(run_name, config), resume_round or 0)
        self._writer.flush()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # a round is long; a crash must not lose the rounds logged

    def finish(self) -> None:
        self._writer.close()


class WandbTracker:
    """A Weights & Biases run in project `project`, its files under the run directory."""

    def __init__(self, project: str) -> None:
        self._wandb = _import_for("wandb", "wandb", "pip install 'fedamole[wandb]'")
        self._project = project
        self._run = None

    def start(
        self, run_dir: Path, run_name: str, config: RunConfig, resume_round: int | None = None
    ) -> None:
        run_id = _stored_run_id(run_dir, "wandb", resume_round) or uuid.uuid4().hex
        _store_run_id(run_dir, "wandb", run_id)
        self._run = self._wandb.init(
            project=self._project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=dict(config),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def finish(self) -> None:
        self._run.finish()


class MLflowTracker:
    """An MLflow run in experiment `project` on the tracking URI the environment sets."""

    def __init__(self, project: str) -> None:
        self._mlflow = _import_for("mlflow", "mlflow", "pip install 'fedamole[mlflow]'")
        self._project = project

    def start(
        self, run_dir: Path, run_name: str, config: RunConfig, resume_round: int | None = None
    ) -> None:
        self._mlflow.set_experiment(self._project)
        run_id = _stored_run_id(run_dir, "mlflow", resume_round)
        run = self._mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        _store_run_id(run_dir, "mlflow", run.info.run_id)
        self._mlflow.log_dict(dict(config), "config.json")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._mlflow.log_metrics(dict(metrics), step=step)

    def finish(self) -> None:
        self._mlflow.end_run()


_TRACKERS: dict[str, Callable[[OutputConfig], Tracker]] = {
    "none": lambda output: NullTracker(),
    "tensorboard": lambda output: TensorBoardTracker(),
    "wandb": lambda output: WandbTracker(output.tracker_project),
    "mlflow": lambda output: MLflowTracker(output.tracker_project),
}


def make_tracker(output: OutputConfig) -> Tracker:
    """The tracker `output.tracker` names; a missing package fails here, before any training."""
    return _TRACKERS[output.tracker](output)


_IDENTIFIERS = frozenset({"round", "client", "split"})


def round_scalars(records: Sequence[MetricRecord]) -> dict[str, float]:
    """Scalars of one round: ``client<id>/<name>`` for each client and ``mean/<name>``, the
    mean over the clients that reported `name` this round. Non-numeric and missing (None)
    values are skipped."""
    _the_round(records)
    per_client: dict[int, dict[str, float]] = {}
    for record in records:
        values = per_client.setdefault(int(record["client"]), {})
        for key, value in record.items():
            if key in _IDENTIFIERS or not _is_number(value):
                continue
            # a split's scores are named by split; the round's own fields (train_loss, bytes,
            # repeated in each split's record) once
            name = f"{record['split']}_{key}" if key in SPLIT_METRICS else key
            values[name] = float(value)
    scalars = {
        f"client{client}/{name}": value
        for client, values in sorted(per_client.items())
        for name, value in sorted(values.items())
    }
    for name in sorted({name for values in per_client.values() for name in values}):
        scalars[f"mean/{name}"] = fmean(v[name] for v in per_client.values() if name in v)
    return scalars


def _the_round(records: Sequence[MetricRecord]) -> int:
    """The one round these records belong to; each must name its round, client and split."""
    if not records:
        raise ValueError("no metric records for this round")
    for record in records:
        missing = sorted(_IDENTIFIERS - set(record))
        if missing:
            raise ValueError(f"metric record {dict(record)} lacks {', '.join(missing)}")
    rounds = sorted({int(record["round"]) for record in records})
    if len(rounds) > 1:
        raise ValueError(f"one round's records expected, got rounds {rounds}")
    return rounds[0]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _config_markdown(run_name: str, config: RunConfig) -> str:
    """The config as a YAML code block (TensorBoard renders text summaries as Markdown)."""
    body = yaml.safe_dump(dict(config), sort_keys=False)
    return f"**{run_name}**\n\n```yaml\n{body}```"


def _import_for(tracker: str, module: str, install: str) -> ModuleType:
    """The tracker's package, or an error that names the setting and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"output.tracker={tracker!r} needs the {module!r} package, which is not installed: "
            f"run `{install}`, or set output.tracker to 'none' or 'tensorboard'"
        ) from exc


def _stored_run_id(run_dir: Path, tracker: str, resume_round: int | None) -> str | None:
    """When resuming, the id of the tracker run this run directory logged to before."""
    path = run_dir / RUN_ID_FILE
    if resume_round is None or not path.is_file():
        return None
    stored = json.loads(path.read_text())
    return stored["run_id"] if stored.get("tracker") == tracker else None


def _store_run_id(run_dir: Path, tracker: str, run_id: str) -> None:
    atomic_write_text(run_dir / RUN_ID_FILE, json.dumps({"tracker": tracker, "run_id": run_id}))
