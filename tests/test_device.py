"""Device and precision plumbing on the CPU (the same code paths a GPU takes), the clear error
for an absent CUDA device, and an end-to-end tiny run on CUDA where one exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import TINY_RUN
from typer.testing import CliRunner

from fedamole.cli import app
from fedamole.config import ConfigError, load_config
from fedamole.device import DeviceError, autocast, resolve_device
from fedamole.models import build_base_model, load_base_model
from fedamole.transports.in_process import run_in_process

TINY = [*TINY_RUN, "eval.max_new_tokens=2"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")


def _run(out: Path, *extra: str) -> dict:
    return run_in_process(load_config(None, [*TINY, f"output.dir={out}", *extra]))


def _bytes_up(out: Path) -> int:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r["bytes_up"] for r in records if r["split"] == "test")


def test_auto_and_explicit_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_unknown_device_names_the_setting():
    with pytest.raises(ConfigError, match="model.device"):
        load_config(None, ["model.device=gpu0"])


@no_cuda
@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_asking_for_absent_cuda_fails_before_data_or_model_load(tmp_path, setting):
    with pytest.raises(DeviceError, match=f"model.device={setting}"):
        resolve_device(setting)
    args = ["run", "--out", str(tmp_path / "run"), "--set", f"model.device={setting}"]
    args += ["--set", "data.source=jsonl", "--set", f"data.path={tmp_path}/missing.jsonl"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"model.device={setting}" in result.output  # not the missing data file: checked first
    assert not (tmp_path / "run").exists()


def test_autocast_bf16_on_cpu_keeps_fp32_master_weights(tmp_path):
    out = tmp_path / "bf16"
    summary = _run(out, "model.device=cpu", "optim.mixed_precision=bf16")
    assert summary["rounds"] == 1
    weights = load_file(str(out / "clients" / "0" / "adapter.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records if "train_loss" in r)


def test_autocast_runs_the_backbone_matmuls_in_bf16():
    model, _ = load_base_model("tiny-random-llama")
    ids = torch.randint(0, 100, (1, 8))
    with autocast(torch.device("cpu"), "bf16"):
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "no"):
        assert model(input_ids=ids).logits.dtype == torch.float32


def test_bfloat16_backbone_trains_fp32_adapters(tmp_path):
    out = tmp_path / "bf16-backbone"
    _run(out, "model.dtype=bfloat16")
    weights = load_file(str(out / "clients" / "1" / "adapter.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_bfloat16_wire_halves_the_bytes_that_travel(tmp_path):
    _run(tmp_path / "fp32")
    _run(tmp_path / "bf16", "federation.wire_dtype=bfloat16")
    assert _bytes_up(tmp_path / "bf16") * 2 == pytest.approx(_bytes_up(tmp_path / "fp32"), rel=0.02)


@pytest.mark.gpu
def test_tiny_run_end_to_end_on_cuda(tmp_path):
    out = tmp_path / "cuda"
    summary = _run(out, "model.device=cuda", "optim.mixed_precision=bf16", "federation.rounds=2")
    assert summary["rounds"] == 2
    checkpoint = load_file(str(out / "checkpoint.safetensors"))
    assert {t.device.type for t in checkpoint.values()} == {"cpu"}  # server state stays on the CPU


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    _run(tmp_path / "plain")
    _run(tmp_path / "checkpointed", "model.gradient_checkpointing=true")
    plain = load_file(str(tmp_path / "plain" / "checkpoint.safetensors"))
    checkpointed = load_file(str(tmp_path / "checkpointed" / "checkpoint.safetensors"))
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)
    assert any(
        not torch.equal(plain[k], torch.zeros_like(plain[k])) for k in plain if "lora_B" in k
    )


def test_gradient_checkpointing_setting_reaches_the_backbone():
    cfg = load_config(None, [*TINY, "model.gradient_checkpointing=true"])
    model, _ = build_base_model(cfg)
    assert model.is_gradient_checkpointing
    assert not build_base_model(load_config(None, TINY))[0].is_gradient_checkpointing


def test_auto_dtype_is_bf16_only_where_the_device_computes_it(monkeypatch):
    from fedamole import device as device_module
    from fedamole.device import resolve_dtype
    from fedamole.models import load_base_model

    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == ("float32", "model.dtype")
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert resolve_dtype("auto", cpu) == (
        "float32",
        "auto: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)",
    )
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert resolve_dtype("auto", cpu) == ("bfloat16", "auto: the CPU has avx512_bf16")
    model, _ = load_base_model("tiny-random-llama", "auto", "cpu")
    assert model.dtype == torch.bfloat16


def test_a_run_records_the_backbone_dtype_auto_chose_and_why(monkeypatch, tmp_path):
    """`auto` is the default; method.json says what it became on this machine, and why."""
    from fedamole import device as device_module
    from fedamole.reporting import RunDir

    cfg = load_config(None, ["model.name=tiny-random-llama", f"output.dir={tmp_path / 'a'}"])
    assert cfg.model.dtype == "auto"
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    RunDir(tmp_path / "a").start(cfg, "fedamole")
    recorded = json.loads((tmp_path / "a" / "method.json").read_text())["backbone_dtype"]
    assert recorded == ["bfloat16", "auto: the CPU has amx_bf16"]
    monkeypatch.setattr(device_module, "cpu_flags", lambda: frozenset())
    RunDir(tmp_path / "b").start(cfg, "fedamole")
    recorded = json.loads((tmp_path / "b" / "method.json").read_text())["backbone_dtype"]
    assert recorded[0] == "float32" and "no native bf16" in recorded[1]
