"""The training loss with vocabulary logits only where a labelled token is predicted."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedamole.data.example import Example
from fedamole.data.prompts import build_prompter
from fedamole.data.tokenize import collate, encode_labelled
from fedamole.federation.training import response_loss
from fedamole.hmole import inject_hmole
from fedamole.models import load_base_model

EXAMPLES = [
    Example("Name a colour.", "", "blue", "t"),
    Example("Reverse the word.", "kenuru", "urunek, reversed", "t"),
    Example("Count to three, then say done.", "", "one two three done", "t"),
]


def _hmole(model):
    adapter = inject_hmole(model, dropout=0.0)
    adapter.set_architecture({m: [0, 1, 3] for m in adapter.modules})
    return adapter.trainable_parameters()


def _lora(model):
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return peft, [p for p in peft.parameters() if p.requires_grad]


@pytest.mark.parametrize("wrap", ["hmole", "lora"])
def test_response_loss_and_gradients_equal_the_models_own(wrap: str) -> None:
    model, tokenizer = load_base_model("tiny-random-llama")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
    if wrap == "hmole":
        params = _hmole(model)
        for param in params:
            torch.nn.init.normal_(param, std=0.3)
    else:
        model, params = _lora(model)
    prompter = build_prompter(tokenizer)
    batch = collate([encode_labelled(prompter, e) for e in EXAMPLES], tokenizer.pad_token_id)
    model.train()

    def loss_and_grads(loss_of):
        for param in params:
            param.grad = None
        loss = loss_of()
        loss.backward()
        return loss.item(), [param.grad.clone() for param in params]

    own, own_grads = loss_and_grads(lambda: model(**batch).loss)
    ours, our_grads = loss_and_grads(lambda: response_loss(model, batch))
    assert ours == pytest.approx(own, rel=1e-5)
    for a, b in zip(own_grads, our_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in our_grads)
