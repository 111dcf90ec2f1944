"""`fedamole generate` and :class:`~fedamole.serving.personalised.ClientModel`: answers to one
prompt and to prompt files, repeatable sampling, FedDPA's per-prompt mix, and the run's base
model, on the tiny one-round runs (tests/serving/conftest.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import fedamole
from fedamole.cli import app
from fedamole.data.prompts import build_prompter
from fedamole.models import load_base_model
from fedamole.serving.personalised import read_prompt_file, request_examples

PROMPTS = ["What is 12 plus 30?", "Sort these words: pear apple fig"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def answers_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("method", ["fedit", "fedamole"])
def test_generate_answers_one_prompt_and_a_file(runs, method, tmp_path):
    client = fedamole.load_client_model(runs[method], 0, device="cpu")
    expected = client.generate(PROMPTS, ["", "pear apple fig"], max_new_tokens=5)

    one = answers_of(invoke("generate", "--run", runs[method], "--max-new-tokens", 5, PROMPTS[0]))
    assert one == [{"client": 0, "instruction": PROMPTS[0], "input": "", "output": expected[0]}]

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(
        json.dumps({"instruction": PROMPTS[0]})
        + "\n\n"
        + json.dumps({"instruction": PROMPTS[1], "input": "pear apple fig"})
        + "\n"
    )
    written = tmp_path / "answers.jsonl"
    result = invoke(
        "generate", "--run", runs[method], "--input-file", jsonl, "--max-new-tokens", 5,
        "--output", written,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["output"] for r in rows] == expected
    assert [r["input"] for r in rows] == ["", "pear apple fig"]


def test_sampling_is_repeatable_with_a_seed_and_plain_text_files_hold_instructions(runs, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    assert read_prompt_file(text) == (PROMPTS, ["", ""])
    args = ["generate", "--run", runs["fedit"], "--input-file", text, "--max-new-tokens", 8]
    sampled = ["--do-sample", "--temperature", 1.5, "--seed", 7]
    first, again = answers_of(invoke(*args, *sampled)), answers_of(invoke(*args, *sampled))
    assert len(first) == 2 and first == again


def test_feddpa_generate_mixes_per_prompt(runs):
    client = fedamole.load_client_model(runs["feddpa"], 1, device="cpu")
    assert len(client.answer_rule(request_examples(PROMPTS))) == 2  # one mix per prompt
    assert len(client.generate(PROMPTS, max_new_tokens=3)) == 2


def test_generate_with_the_base_model_answers_without_adapters(runs):
    rows = answers_of(
        invoke("generate", "--run", runs["fedit"], "--base", "--max-new-tokens", 5, PROMPTS[0])
    )
    base, tokenizer = load_base_model("tiny-random-llama")
    prompter = build_prompter(tokenizer, "auto")
    expected = fedamole.ClientModel(base, prompter, "base").generate(PROMPTS[:1], max_new_tokens=5)
    assert rows == [
        {"client": "base", "instruction": PROMPTS[0], "input": "", "output": expected[0]}
    ]
