"""Trackers: TensorBoard event files read back by TensorBoard itself, missing-package errors,
and the naming of metrics.jsonl records as tracker scalars."""

from __future__ import annotations

import json
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

from fedamole.config import Config, ConfigError, OutputConfig, load_config
from fedamole.reporting import metric_records
from fedamole.tracking import (
    TENSORBOARD_DIR,
    NullTracker,
    TensorBoardTracker,
    make_tracker,
    round_scalars,
)
from fedamole.transports.in_process import run_in_process


def _round(round_idx: int, offset: float = 0.0) -> list[dict]:
    """Two clients' records for one round, as the runners write them to metrics.jsonl."""
    records = []
    for client in (0, 1):
        metrics = {
            "val_rougeL": 0.1 * round_idx + 0.01 * client + offset,
            "test_rougeL": 0.2 * round_idx + 0.02 * client + offset,
            "train_loss": 2.0 - round_idx - client,
        }
        records += metric_records(round_idx, client, metrics, 100 + client, 200 + client)
    return records


def test_round_scalars_per_client_and_mean():
    records = [
        {"round": 3, "client": 1, "split": "val", "rougeL": 0.4, "exact_match": 0.1,
         "train_loss": 1.2, "bytes_up": 123, "bytes_down": 456},
        {"round": 3, "client": 1, "split": "test", "rougeL": 0.5, "exact_match": 0.2,
         "train_loss": 1.2, "bytes_up": 123, "bytes_down": 456},
        {"round": 3, "client": 4, "split": "test", "rougeL": 0.7, "exact_match": 0.0,
         "train_loss": None, "bytes_up": 1, "bytes_down": 2},
    ]  # fmt: skip
    assert round_scalars(records) == {
        "client1/bytes_down": 456.0,
        "client1/bytes_up": 123.0,
        "client1/test_exact_match": 0.2,
        "client1/test_rougeL": 0.5,
        "client1/train_loss": 1.2,
        "client1/val_exact_match": 0.1,
        "client1/val_rougeL": 0.4,
        "client4/bytes_down": 2.0,
        "client4/bytes_up": 1.0,
        "client4/test_exact_match": 0.0,
        "client4/test_rougeL": 0.7,
        "mean/bytes_down": (456 + 2) / 2,
        "mean/bytes_up": (123 + 1) / 2,
        "mean/test_exact_match": (0.2 + 0.0) / 2,
        "mean/test_rougeL": (0.5 + 0.7) / 2,
        "mean/train_loss": 1.2,  # client 4 did not train
        "mean/val_exact_match": 0.1,  # only client 1 was validated
        "mean/val_rougeL": 0.4,
    }


def test_round_scalars_refuse_mixed_rounds_and_bare_records():
    with pytest.raises(ValueError, match=r"rounds \[0, 1\]"):
        round_scalars(_round(0) + _round(1))
    with pytest.raises(ValueError, match="lacks split"):
        round_scalars([{"round": 0, "client": 0, "rougeL": 0.5}])
    with pytest.raises(ValueError, match="no metric records"):
        round_scalars([])


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) point TensorBoard shows, per tag, duplicates included."""
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def _config_texts(log_dir) -> list[str]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [
        event.tensor_proto.string_val[0].decode()
        for event in accumulator.Tensors("config/text_summary")
    ]


def test_tensorboard_writes_what_tensorboard_reads(tmp_path):
    config = Config().model_dump(mode="json")
    tracker = make_tracker(OutputConfig(tracker="tensorboard"))
    assert isinstance(tracker, TensorBoardTracker)
    tracker.start(tmp_path, "demo", config)
    for round_idx in range(3):
        tracker.log(round_scalars(_round(round_idx)), step=round_idx)
    tracker.finish()

    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    expected = {r: round_scalars(_round(r)) for r in range(3)}
    assert set(scalars) == set(expected[0])
    for tag, points in scalars.items():
        assert points == [(r, pytest.approx(expected[r][tag], rel=1e-6)) for r in range(3)]
    assert scalars["mean/test_rougeL"][2][1] == pytest.approx((0.4 + 0.42) / 2, rel=1e-6)
    [text] = _config_texts(tmp_path / TENSORBOARD_DIR)
    assert "**demo**" in text and f"rounds: {config['federation']['rounds']}" in text


def test_tensorboard_resume_replaces_the_rounds_logged_again(tmp_path):
    """A run killed after round 2 and resumed at round 2 shows each round once, with the
    resumed session's values from round 2 on."""
    config = Config().model_dump(mode="json")
    first = make_tracker(OutputConfig(tracker="tensorboard"))
    first.start(tmp_path, "demo", config)
    for round_idx in range(3):
        first.log(round_scalars(_round(round_idx)), step=round_idx)
    first.finish()
    # TensorBoard reads event files in name order, whose first field is the creation second;
    # a resumed session always starts in a later second than the one it resumes.
    created = int(time.time())
    while int(time.time()) == created:
        time.sleep(0.05)

    resumed = make_tracker(OutputConfig(tracker="tensorboard"))
    resumed.start(tmp_path, "demo", config, resume_round=2)
    for round_idx in (2, 3):
        resumed.log(round_scalars(_round(round_idx, offset=1.0)), step=round_idx)
    resumed.finish()

    test_rougeL = _scalars(tmp_path / TENSORBOARD_DIR)["client1/test_rougeL"]
    expected = [(0, 0.02), (1, 0.22), (2, 1.42), (3, 1.62)]
    assert test_rougeL == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
    assert len(_config_texts(tmp_path / TENSORBOARD_DIR)) == 2  # one per session


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_tracker_package_names_the_setting_and_the_install(tracker, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # Python's own marker: import fails
    with pytest.raises(ConfigError) as error:
        make_tracker(OutputConfig(tracker=tracker))
    message = str(error.value)
    assert f"output.tracker={tracker!r}" in message
    assert f"pip install 'fedamole[{tracker}]'" in message


def test_missing_tensorboard_is_named_too(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"output.tracker='tensorboard'.*pip install tensorboard"):
        make_tracker(OutputConfig(tracker="tensorboard"))


def test_default_is_no_tracker(tmp_path):
    tracker = make_tracker(Config().output)
    assert isinstance(tracker, NullTracker)
    tracker.start(tmp_path, "demo", {})
    tracker.log(round_scalars(_round(0)), step=0)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_tracker_setting_is_validated():
    with pytest.raises(ValueError, match="tracker"):
        OutputConfig(tracker="neptune")


def test_a_tiny_run_with_tensorboard_logs_its_metrics_jsonl(tmp_path):
    """The in-process run's own records reach TensorBoard: per client, mean and server."""
    out = tmp_path / "run"
    settings = [
        *TINY_RUN,
        "federation.rounds=2",
        "federation.local_steps=1",
        "eval.max_new_tokens=2",
        "output.tracker=tensorboard",
        f"output.dir={out}",
    ]
    run_in_process(load_config(None, settings))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(out / TENSORBOARD_DIR)
    for round_idx in (0, 1):
        test = [r for r in records if r["round"] == round_idx and r["split"] == "test"]
        assert scalars["mean/test_rougeL"][round_idx] == (
            round_idx,
            pytest.approx(sum(r["rougeL"] for r in test) / len(test), rel=1e-6),
        )
        assert scalars["client1/train_loss"][round_idx][1] == pytest.approx(
            next(r["train_loss"] for r in test if r["client"] == 1), rel=1e-6
        )
    server = [r for r in records if r["split"] == "server"]
    assert [v for _, v in scalars["server/rsea_assignment_change"]] == pytest.approx(
        [r["rsea_assignment_change"] for r in server], rel=1e-6
    )
