"""The model a client is served is the model it was evaluated with, for every method: the tiny
one-round run of each method (tests/serving/conftest.py), its client model loaded back (from the
run and from an export) and scored on the client's test split, against the per-example scores the
run recorded; and the errors that name what cannot be loaded."""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fedamole
from fedamole.cli import app
from fedamole.config import load_config
from fedamole.data.pipeline import prepare_client_splits
from fedamole.evaluation import exact_match_scores, fitting_indices, rouge_l_scores
from fedamole.methods import METHODS
from fedamole.methods.fdlora import FUSION_KEY, GLOBAL, PERSONAL
from fedamole.methods.peft_method import LoraHandle
from fedamole.reporting import RunDir, RunDirError
from fedamole.serving import ClientModel, export_client, load_client_model
from fedamole.serving.loading import ExportError
from fedamole.serving.personalised import request_examples

CLIENT = 1


def recorded_test_scores(run: Path, client: int) -> dict[str, list[float]]:
    """The per-example test scores the run recorded for ``client`` in its last round."""
    rows = [
        r
        for r in RunDir(run).read_example_scores()
        if r["client"] == client and r["split"] == "test"
    ]
    last = max(rows, key=lambda r: r["round"])
    return {k: v for k, v in last.items() if k not in ("round", "client", "split")}


def served_test_scores(model: ClientModel, run: Path, client: int) -> dict[str, list[float]]:
    """The served model's answers to the client's test prompts, scored as evaluation scores."""
    cfg = load_config(run / "config.yaml")
    test = prepare_client_splits(cfg)[client].splits.test
    kept = [test[i] for i in fitting_indices(model.prompter, test, cfg.model.max_length)]
    answers = model.generate(
        [ex.instruction for ex in kept],
        [ex.input for ex in kept],
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )
    references = [ex.output for ex in kept]
    return {
        "rougeL": rouge_l_scores(answers, references),
        "exact_match": exact_match_scores(answers, references),
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_loaded_and_exported_models_reproduce_the_recorded_evaluation(runs, method, tmp_path):
    recorded = recorded_test_scores(runs[method], CLIENT)
    assert recorded["rougeL"], "the tiny run scored no test examples"

    from_run = load_client_model(runs[method], CLIENT, device="cpu")
    assert served_test_scores(from_run, runs[method], CLIENT) == recorded

    folder = export_client(runs[method], CLIENT, tmp_path / "export").folder
    # mixed per prompt from the client's own prompts (FedDPA): loaded with PEFT as its README
    # says (tests/serving/test_export.py); methods with a router rebuild through the method
    if method == "feddpa":
        with pytest.raises(ExportError, match="mixed per prompt"):
            fedamole.load_pretrained(folder, device="cpu")
        return
    exported = fedamole.load_pretrained(folder, device="cpu")
    assert served_test_scores(exported, runs[method], CLIENT) == recorded


PROMPT = request_examples(["Sort these words: pear apple fig"])


def next_token_logits(model: ClientModel, context: AbstractContextManager) -> torch.Tensor:
    ids = torch.tensor([model.prompter.prompt_ids(PROMPT[0])])
    with context, torch.no_grad():
        return model.model(input_ids=ids).logits[0, -1]


def test_fdlora_serves_its_fused_model_not_the_global_lora(runs, tmp_path):
    """The review's case: fusion weights [0, 1] (the personal LoRA alone) must serve the
    personal LoRA, not the global one."""
    run = Path(shutil.copytree(runs["fdlora"], tmp_path / "fdlora"))
    weights_file = run / "clients" / str(CLIENT) / "adapter.safetensors"
    state = load_file(str(weights_file))
    personal_only = state | {FUSION_KEY: torch.tensor([0.0, 1.0])}
    for key in [k for k in state if k.startswith(f"{GLOBAL}/") and "lora_B" in k]:
        personal_only[key] = torch.full_like(state[key], 0.5)  # the two LoRAs differ clearly
    save_file(personal_only, str(weights_file))

    client = load_client_model(run, CLIENT, device="cpu")
    ((served_context, _),) = client.answer_rule(PROMPT)
    served = next_token_logits(client, served_context)
    handle = LoraHandle(client.model, (GLOBAL, PERSONAL))
    personal = next_token_logits(client, handle.mixing({PERSONAL: 1.0}))
    global_only = next_token_logits(client, handle.mixing({GLOBAL: 1.0}))
    torch.testing.assert_close(served, personal)
    assert (served - global_only).abs().max() > 1e-3


def test_unknown_client_and_unfinished_run_are_named(runs, tmp_path):
    result = CliRunner().invoke(
        app, ["generate", "--run", str(runs["fedit"]), "--client", "7", "hi"]
    )
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "no saved model for client 7" in message
    assert "saved: 0, 1, 2, 3" in message

    unfinished = Path(shutil.copytree(runs["fedit"], tmp_path / "fedit"))
    (unfinished / "summary.json").unlink()
    with pytest.raises(RunDirError, match=r"is not finished .* --resume"):
        fedamole.load_client_model(unfinished, 0)
    with pytest.raises(RunDirError, match="no such directory"):
        export_client(tmp_path / "nowhere", 0, tmp_path / "x")
