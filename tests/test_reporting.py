"""Run summaries: validation-selected rounds, clients missing from the final round; the round
files a resume rewinds."""

from __future__ import annotations

import pytest

from fedamole.reporting import METRICS, RunDir, metric_records, summarise


def _records(client, rnd, val, test):
    metrics = {"val_rougeL": val, "test_rougeL": test, "train_loss": 1.0}
    return metric_records(rnd, client, metrics, bytes_up=10, bytes_down=20)


def test_selection_uses_validation_and_a_dropped_client_reports_its_latest_round():
    records = (
        _records(0, 0, val=0.2, test=0.9)
        + _records(0, 1, val=0.5, test=0.1)
        + _records(0, 2, val=0.4, test=0.3)
        + _records(1, 0, val=0.3, test=0.6)
        + _records(1, 1, val=0.1, test=0.2)  # client 1 missed round 2
    )
    summary = summarise(records, wall_time_s=1.0)
    c0, c1 = summary["per_client"]["0"], summary["per_client"]["1"]
    assert c0["selected"] == {"rougeL": 0.1, "round": 1}  # best val, not best test
    assert c0["last"] == {"rougeL": 0.3, "round": 2}
    assert c1["last"] == {"rougeL": 0.2, "round": 1}
    assert c1["selected"] == {"rougeL": 0.6, "round": 0}
    assert summary["mean"]["last"] == {"rougeL": pytest.approx(0.25)}
    assert summary["mean"]["selected"] == {"rougeL": pytest.approx(0.35)}
    assert summary["rounds"] == 3
    assert summary["total_bytes_up"] == 50 and summary["total_bytes_down"] == 100


def test_ties_select_the_latest_round():
    records = (
        _records(0, 0, val=0.5, test=0.1)
        + _records(0, 1, val=0.2, test=0.2)
        + _records(0, 2, val=0.5, test=0.3)  # ties round 0: the model trained longer wins
        + _records(1, 0, val=0.4, test=0.4)
        + _records(1, 1, val=0.4, test=0.5)
        + _records(1, 2, val=0.1, test=0.6)
    )
    summary = summarise(records, wall_time_s=1.0)
    assert summary["per_client"]["0"]["selected"]["round"] == 2
    assert summary["per_client"]["1"]["selected"]["round"] == 1
    assert summary["best_round"]["round"] == 0  # mean val 0.45, 0.30, 0.30: no tie at the top
    tied = _records(0, 0, val=0.25, test=0.1) + _records(0, 1, val=0.75, test=0.2)
    tied += _records(1, 0, val=0.75, test=0.3) + _records(1, 1, val=0.25, test=0.4)
    assert summarise(tied, 1.0)["best_round"]["round"] == 1  # 0.5 and 0.5: the latest


def test_best_mean_validation_round_is_one_round_for_everybody():
    records = (
        _records(0, 0, val=0.6, test=0.1)
        + _records(0, 1, val=0.2, test=0.2)
        + _records(1, 0, val=0.0, test=0.3)
        + _records(1, 1, val=0.6, test=0.4)
    )
    summary = summarise(records, wall_time_s=1.0)
    assert summary["best_round"] == {
        "round": 1,
        "val": pytest.approx(0.4),
        "rougeL": pytest.approx(0.3),
    }
    assert [c["selected"]["round"] for c in summary["per_client"].values()] == [0, 1]


def test_rounds_are_appended_and_a_resume_rewinds_past_a_cut_off_append(tmp_path):
    """Each round adds only its own rows; a kill mid-append leaves a line without its newline,
    which reading skips and a resume (rewind to the checkpoint's round) removes with the
    un-checkpointed round's rows."""
    run_dir = RunDir(tmp_path)
    for rnd in (0, 1, 2):
        run_dir.append_round(metric_records(rnd, 0, {"test_rougeL": 0.1 * rnd}, 1, 1), [])
    assert [r["round"] for r in run_dir.read_records()] == [0, 0, 1, 1, 2, 2]
    with (tmp_path / METRICS).open("a") as file:
        file.write('{"round": 3, "cli')  # the append a kill cut short
    assert [r["round"] for r in run_dir.read_records()] == [0, 0, 1, 1, 2, 2]

    run_dir.rewind(2)
    assert [r["round"] for r in run_dir.read_records()] == [0, 0, 1, 1]
    assert (tmp_path / METRICS).read_text().endswith("\n")
    run_dir.append_round(metric_records(2, 0, {"test_rougeL": 0.5}, 1, 1), [])
    assert [r["round"] for r in run_dir.read_records()] == [0, 0, 1, 1, 2, 2]
