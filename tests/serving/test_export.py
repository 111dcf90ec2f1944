"""Models people take home, on the tiny one-round runs (tests/serving/conftest.py): PEFT exports
of the baselines, FedAMoLE's self-contained export, the static LoRA and its routing weights, and
the errors for bad requests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fedamole
from fedamole.cli import app
from fedamole.data.example import DataError
from fedamole.data.prompts import build_prompter
from fedamole.federation.training import fixed_batches
from fedamole.hmole.fold import mean_routing_weights
from fedamole.hmole.keys import expert_key, shared_key
from fedamole.methods.feddpa import GLOBAL, LOCAL
from fedamole.methods.peft_method import LoraHandle
from fedamole.models import load_base_model
from fedamole.serving.export import export_client
from fedamole.serving.loading import ExportError, client_data, open_saved_client, rebuild
from fedamole.serving.personalised import read_prompt_file, request_examples

PROMPTS = ["What is 12 plus 30?", "Sort these words: pear apple fig"]


def copy_run(runs, method: str, where: Path) -> Path:
    return Path(shutil.copytree(runs[method], where / f"{method}-copy"))


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """Next-token logits of both prompts, as the client's model sees them (right-padded)."""
    prompter = build_prompter(tokenizer, "auto")  # the tiny runs' format: Alpaca
    ids = [prompter.prompt_ids(ex) for ex in request_examples(PROMPTS)]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"][..., None]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------ PEFT
def test_fedit_export_is_the_runs_adapter_and_loads_with_peft(runs, tmp_path):
    out = export_client(runs["fedit"], 1, tmp_path / "fedit-1").folder

    saved = load_file(str(runs["fedit"] / "clients" / "1" / "adapter.safetensors"))
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert {f"default/{k}": v for k, v in exported.items()}.keys() == saved.keys()
    for key, value in exported.items():
        assert torch.equal(value, saved[f"default/{key}"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-random-llama"

    base, tokenizer = load_base_model("tiny-random-llama")
    reference = logits(base, tokenizer)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    client = fedamole.load_client_model(runs["fedit"], 1, device="cpu")
    from_run = logits(client.model, client.tokenizer)
    torch.testing.assert_close(logits(peft_model, tokenizer), from_run)
    assert (from_run - reference).abs().max() > 1e-2  # the adapter changes the model
    loaded = fedamole.load_pretrained(out, device="cpu")  # a PEFT export loads the same way
    torch.testing.assert_close(logits(loaded.model, loaded.tokenizer), from_run)


def test_feddpa_export_has_both_adapters_and_its_readme_recipe_mixes_them(runs, tmp_path):
    out = export_client(runs["feddpa"], 0, tmp_path / "feddpa").folder
    assert (out / "global" / "adapter_model.safetensors").is_file()
    assert (out / "local" / "adapter_model.safetensors").is_file()
    anchors = json.loads((out / "mixing.json").read_text())["anchors"]
    assert len(anchors) == 5 and all("### Response:" in a for a in anchors)
    assert "set_scale" in (out / "README.md").read_text()
    with pytest.raises(ExportError, match="mixed per prompt"):
        fedamole.load_pretrained(out)

    client = fedamole.load_client_model(runs["feddpa"], 0, device="cpu")
    handle = LoraHandle(client.model, (GLOBAL, LOCAL))
    with handle.mixing({GLOBAL: 0.7, LOCAL: 0.3}):
        expected = logits(client.model, client.tokenizer)

    base, tokenizer = load_base_model("tiny-random-llama")
    model = PeftModel.from_pretrained(base, out / "global", adapter_name="global")
    model.load_adapter(out / "local", adapter_name="local")
    model.base_model.set_adapter(["global", "local"])
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale("global", 0.7)
            layer.set_scale("local", 0.3)
    torch.testing.assert_close(logits(model.eval(), tokenizer), expected)


# ------------------------------------------------------------------------------------ FedAMoLE
def test_fedamole_export_loads_from_a_copy_of_the_folder_alone(runs, tmp_path):
    run = copy_run(runs, "fedamole", tmp_path)
    exported = export_client(run, 2, tmp_path / "export").folder
    client = fedamole.load_client_model(run, 2, device="cpu")
    expected = logits(client.model, client.tokenizer)
    answers = client.generate(PROMPTS, max_new_tokens=4)
    shutil.rmtree(run)
    elsewhere = Path(shutil.copytree(exported, tmp_path / "elsewhere" / "model"))
    shutil.rmtree(exported)

    loaded = fedamole.load_pretrained(elsewhere, device="cpu")
    assert not loaded.model.training
    torch.testing.assert_close(logits(loaded.model, loaded.tokenizer), expected)
    assert loaded.generate(PROMPTS, max_new_tokens=4) == answers
    doc = json.loads((elsewhere / "fedamole_model.json").read_text())
    assert (
        doc["architecture"]
        == json.loads((runs["fedamole"] / "clients" / "2" / "architecture.json").read_text())[
            "architecture"
        ]
    )
    assert {"rank", "alpha", "dropout", "top_k", "target_modules"} <= doc["hmole"].keys()


def silence_local_experts(run: Path, client: int) -> None:
    """Every local expert's B set to zero: only the shared expert changes the model."""
    path = run / "clients" / str(client) / "adapter.safetensors"
    state = load_file(str(path))
    for key in state:
        if ".experts." in key and key.endswith("lora_B"):
            state[key] = torch.zeros_like(state[key])
    save_file(state, str(path))


def test_static_lora_is_exact_with_silent_local_experts_and_merges(runs, tmp_path):
    run = copy_run(runs, "fedamole", tmp_path)
    silence_local_experts(run, 0)
    out = export_client(run, 0, tmp_path / "static", static_lora=True).folder
    routed = fedamole.load_client_model(run, 0, device="cpu")
    expected = logits(routed.model, routed.tokenizer)

    base, tokenizer = load_base_model("tiny-random-llama")
    static = PeftModel.from_pretrained(base, out).eval()
    unmerged = logits(static, tokenizer)
    torch.testing.assert_close(unmerged, expected)
    assert (
        unmerged - logits(load_base_model("tiny-random-llama")[0], tokenizer)
    ).abs().max() > 1e-2
    torch.testing.assert_close(logits(static.merge_and_unload(), tokenizer), unmerged)
    fidelity = json.loads((out / "fedamole_model.json").read_text())["fidelity"]
    assert fidelity["routed"] == fidelity["static"]
    assert fidelity["mean_abs_logit_diff"] < 1e-5


def test_static_lora_folds_shared_and_weighted_local_experts(runs, tmp_path):
    result = invoke(
        "export", "--run", runs["fedamole"], "--client", 1, "--out", tmp_path / "s", "--static-lora"
    )
    assert result.exit_code == 0, result.output
    assert "static LoRA" in result.output and "rougeL" in result.output
    out = tmp_path / "s"
    doc = json.loads((out / "fedamole_model.json").read_text())
    state = load_file(str(runs["fedamole"] / "clients" / "1" / "adapter.safetensors"))
    base, _ = load_base_model("tiny-random-llama")
    static = PeftModel.from_pretrained(base, out)
    scale = 16.0 / 8  # the run's hmole alpha / r
    for module, weights in doc["routing_weights"].items():
        assert sum(weights.values()) == pytest.approx(1.0)
        expected = state[shared_key(module, "B")] @ state[shared_key(module, "A")]
        for e, w in weights.items():
            expert = int(e)
            expected += (
                w * state[expert_key(module, expert, "B")] @ state[expert_key(module, expert, "A")]
            )
        layer = static.base_model.model.get_submodule(module)
        torch.testing.assert_close(layer.get_delta_weight("default"), scale * expected)
    assert doc["fidelity"]["prompts"] > 0


# ------------------------------------------------------------------------------------ errors
def test_a_model_kept_on_a_flower_node_says_where_it_is(runs, tmp_path):
    # What a Flower run of FedDPA leaves: the model's JSON with the folder the node reported,
    # and no weights (they stay on the node).
    run = copy_run(runs, "feddpa", tmp_path)
    client = run / "clients" / "1"
    (client / "adapter.safetensors").unlink()
    doc = json.loads((client / "adapter.json").read_text())
    kept_at = "/srv/org1/nodes/r1/client1/model"
    (client / "adapter.json").write_text(json.dumps(doc | {"kept_at": kept_at}))
    result = invoke("export", "--run", run, "--client", 1, "--out", tmp_path / "x")
    assert result.exit_code == 2
    message = flat(result.output)
    assert "client 1 of run" in message and "Flower node" in message
    assert f"{kept_at}/ on that node" in message
    assert not (tmp_path / "x").exists()


def test_bad_export_requests_and_prompt_files_fail_before_loading(runs, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_client(runs["fedit"], 0, taken)
    with pytest.raises(ExportError, match="PEFT model already"):
        export_client(runs["fedit"], 0, tmp_path / "y", static_lora=True)
    with pytest.raises(ExportError, match="fedamole_model.json not found"):
        fedamole.load_pretrained(taken)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object"):
        read_prompt_file(bad)
    result = invoke("generate", "--run", runs["fedit"], "--input-file", bad)
    assert result.exit_code == 2 and "bad.jsonl:2" in flat(result.output)
    assert invoke("generate", "--run", runs["fedit"]).exit_code == 2  # no prompt at all


def test_mean_routing_weights_count_only_real_tokens(runs):
    """Batches of one (no padding) and padded batches give the same averages."""
    saved = open_saved_client(runs["fedamole"], 0, device="cpu")
    runtime = rebuild(saved)
    adapter, prompter = runtime.handle, runtime.data.prompter
    tokenizer = prompter.tokenizer
    train = client_data(saved, prompter).train
    single = mean_routing_weights(adapter, fixed_batches(train, 1, tokenizer.pad_token_id))
    padded = mean_routing_weights(adapter, fixed_batches(train, 5, tokenizer.pad_token_id))
    assert single.keys() == padded.keys() == set(adapter.modules)
    for module, weights in single.items():
        assert list(weights) == adapter.architecture[module]
        assert weights == pytest.approx(padded[module], abs=1e-6)
        assert sum(weights.values()) == pytest.approx(1.0)
