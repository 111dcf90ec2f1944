"""Quantised frozen backbones (model.quantization): NF4 through bitsandbytes, int8 weight-only
through torchao, under HMoLE and PEFT LoRA, through whole runs, resume, generate and serve."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from tiny_run import TINY_RUN

from fedamole.config import load_config
from fedamole.hmole import inject_hmole
from fedamole.models import load_base_model
from fedamole.quantization import QuantizationError, check_quantization, frozen_linears
from fedamole.reporting import RunDir
from fedamole.serving import load_client_model
from fedamole.serving.api import create_app
from fedamole.serving.pool import RunPool
from fedamole.serving.scheduler import BatchScheduler
from fedamole.serving.settings import ServeSettings
from fedamole.transports.in_process import run_in_process

QUANTIZATIONS = ["nf4", "int8"]


def _quantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The stored (quantised) weight as plain bytes-bearing tensor data, to compare copies."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return weight.data.clone()
    return weight.qdata.clone()  # torchao's int8 tensor keeps its int8 values in qdata


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_decoder_linears_are_quantised_and_hmole_trains_on_them(quantization: str) -> None:
    reference, _ = load_base_model("tiny-random-llama")
    model, _ = load_base_model("tiny-random-llama", quantization=quantization)
    names = frozen_linears(reference)
    assert names and all("lm_head" not in n for n in names)
    for name in names:
        weight = model.get_submodule(name).weight
        assert type(weight) not in (torch.Tensor, torch.nn.Parameter), name
    assert type(model.lm_head.weight) is torch.nn.Parameter  # the head stays as it was
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close = model(input_ids=ids).logits - reference(input_ids=ids).logits
    assert 0 < close.abs().max() < 0.5  # quantisation error: present, and small

    adapter = inject_hmole(model, dropout=0.0)
    adapter.set_architecture({m: [0, 1, 2] for m in adapter.modules})
    base = adapter.layers[adapter.modules[0]].base
    frozen = _quantized_weight(base)
    params = adapter.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=0.01)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert torch.equal(_quantized_weight(base), frozen)


def test_a_missing_quantisation_library_is_named_before_anything_loads(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "torchao" else real(name)
    )
    with pytest.raises(QuantizationError, match=r"model.quantization=int8 needs torchao"):
        check_quantization("int8")


def _config(out, quantization: str, *extra: str):
    return load_config(
        None,
        [
            *TINY_RUN,
            "model.device=cpu",
            f"model.quantization={quantization}",
            f"output.dir={out}",
            *extra,
        ],
    )


def _metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_quantised_fedamole_resumes_to_the_uninterrupted_run(quantization, tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) once round 0's checkpoint is written, then resumed: the rebuilt
    quantised backbone continues exactly where the run stopped."""
    rounds = "federation.rounds=2"
    reference = run_in_process(_config(tmp_path / "reference", quantization, rounds))

    save = RunDir.save_checkpoint

    def save_then_stop(self, checkpoint):
        save(self, checkpoint)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_checkpoint", save_then_stop)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_in_process(_config(out, quantization, rounds))
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    resumed = run_in_process(_config(out, quantization, rounds), resume=True)
    assert _metrics(resumed) == _metrics(reference)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_quantised_fedit_is_generated_and_served(quantization, tmp_path) -> None:
    """`fedamole generate`'s model and the API answer alike from the quantised backbone."""
    out = tmp_path / "fedit"
    run_in_process(_config(out, quantization), method="fedit")
    prompt = "Name a colour."
    alone = load_client_model(out, 0).generate(prompt, max_new_tokens=4)[0]

    pool = RunPool(out, [0], "cpu")
    layer = pool.handle.model.base_model.model.model.layers[0].self_attn.k_proj
    assert type(layer.weight) is not torch.nn.Parameter  # served on the quantised backbone
    settings = ServeSettings(max_batch=4, max_queue=8)
    scheduler = BatchScheduler(pool, settings)
    scheduler.start()
    try:
        with TestClient(create_app(pool, scheduler, None, settings)) as client:
            answer = client.post(
                "/v1/chat/completions",
                json={
                    "model": "client-0",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
            )
    finally:
        scheduler.stop()
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == alone
