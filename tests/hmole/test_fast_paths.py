"""The stacked HMoLE layer against a plain per-token reading of SPEC 2, its inference and
mixed-precision paths, and its device placement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedamole.hmole import HMoLELinear, inject_hmole
from fedamole.hmole.layer import RoutingContext
from fedamole.models import load_base_model

MATMULS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}


class _OpLog(TorchDispatchMode):
    """Every aten op dispatched while active, with the dtypes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if isinstance(a, Tensor)]
        self.calls.append((str(func.overloadpacket), dtypes))
        return func(*args, **(kwargs or {}))


def _layer(experts=(2, 5, 9), top_k=2, d_in=12, d_out=7, rank=3, seed=0) -> HMoLELinear:
    torch.manual_seed(seed)
    layer = HMoLELinear(nn.Linear(d_in, d_out), "m", RoutingContext(), rank, 6.0, 0.0, top_k)
    layer.set_experts(list(experts))
    with torch.no_grad():
        layer.up.normal_()  # B = 0 at init would hide the experts' contribution
        layer.down.normal_()
    return layer


def _reference(layer: HMoLELinear, x: Tensor, mask: Tensor | None, weights: dict[str, Tensor]):
    """SPEC 2 token by token from separate per-expert tensors: output and L_lb."""
    s, r, k = layer.scaling, layer.rank, layer.top_k
    A, B = weights["expert_A"], weights["expert_B"]
    tokens = x.reshape(-1, layer.in_features)
    keep = torch.ones(len(tokens), dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    outputs, probs, slots = [], [], []
    for token in tokens:
        query = weights["router"] @ token
        logits = torch.stack([(A_e @ token) @ query for A_e in A]) / math.sqrt(r)
        p = logits.softmax(-1)
        top_p, top_idx = p.topk(k)
        h = layer.base(token) + s * weights["shared_B"] @ (weights["shared_A"] @ token)
        for w, e in zip(top_p / top_p.sum(), top_idx.tolist(), strict=True):
            h = h + w * s * B[e] @ (A[e] @ token)
        outputs.append(h)
        probs.append(p)
        slots.append(torch.zeros_like(p).index_fill(0, top_idx, 1.0))
    P = torch.stack(probs)[keep].mean(0)
    f = torch.stack(slots)[keep].sum(0) / (k * keep.sum())
    lb = len(A) * (P * f).sum()
    return torch.stack(outputs).view(*x.shape[:-1], -1), lb


def _reference_weights(layer: HMoLELinear) -> dict[str, Tensor]:
    views = {
        "expert_A": layer.expert_A,
        "expert_B": layer.expert_B,
        "shared_A": layer.shared_A,
        "shared_B": layer.shared_B,
        "router": layer.router_weight,
    }
    return {k: v.detach().clone().requires_grad_(True) for k, v in views.items()}


def _grads_of_stacks(layer: HMoLELinear) -> dict[str, Tensor]:
    """The stacked gradients cut back into the reference's per-part tensors."""
    n, r = layer.num_experts, layer.rank
    grad_A, grad_B = layer.down.grad.t(), layer.up.grad.t()
    return {
        "expert_A": grad_A[: n * r].reshape(n, r, -1),
        "shared_A": grad_A[n * r : (n + 1) * r],
        "router": grad_A[(n + 1) * r :],
        "expert_B": grad_B[:, : n * r].reshape(-1, n, r).transpose(0, 1),
        "shared_B": grad_B[:, n * r :],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_mode_matches_per_token_reference_with_gradients(dtype):
    """In float64 the two agree to rounding: the layer computes in its parameters' precision."""
    layer = _layer().to(dtype)
    layer.train()
    x = torch.randn(3, 4, layer.in_features, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    projection = torch.randn(3, 4, layer.out_features, dtype=dtype)

    layer.context.start_forward(mask)
    out = layer(x)
    lb = layer.context.load_balancing_loss()
    ((out * projection).sum() + 0.5 * lb).backward()

    weights = _reference_weights(layer)
    ref_out, ref_lb = _reference(layer, x, mask, weights)
    ((ref_out * projection).sum() + 0.5 * ref_lb).backward()

    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lb, ref_lb, **tol)
    grads = _grads_of_stacks(layer)
    for part, tensor in weights.items():
        torch.testing.assert_close(grads[part], tensor.grad, **tol, msg=part)


def test_eval_mode_matches_reference_and_records_nothing():
    layer = _layer(experts=(0, 1, 3, 4), top_k=3)
    layer.eval()
    x = torch.randn(2, 5, layer.in_features)
    layer.context.start_forward(None)
    with torch.no_grad():
        out = layer(x)
        ref_out, _ = _reference(layer, x, None, _reference_weights(layer))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert layer.context.records == []


def test_model_lb_loss_is_the_sum_of_per_module_references(tiny_model):
    """Modules with different expert counts (batched apart) and a padded batch."""
    model, tok = tiny_model
    adapter = inject_hmole(model, dropout=0.0)
    adapter.set_architecture(
        {m: [0, 4] if i % 2 else [1, 2, 6] for i, m in enumerate(adapter.modules)}
    )
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(std=0.3)
    batch = tok(["one short", "a rather longer line of text"], return_tensors="pt", padding=True)
    inputs: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, n=name: inputs.__setitem__(n, args[0]))
        for name, layer in adapter.layers.items()
    ]
    model.train()
    model(**batch)
    for hook in hooks:
        hook.remove()
    expected = sum(
        _reference(
            layer, inputs[name].detach(), batch["attention_mask"], _reference_weights(layer)
        )[1]
        for name, layer in adapter.layers.items()
    )
    torch.testing.assert_close(adapter.load_balancing_loss(), expected, rtol=1e-5, atol=1e-6)


def test_op_count_does_not_grow_with_the_number_of_experts():
    """No per-expert loop: the same ops run for 2 or 9 local experts, forward and backward."""
    counts = []
    for experts in (range(2), range(9)):
        layer = _layer(experts=tuple(experts))
        layer.train()
        x = torch.randn(2, 3, layer.in_features, requires_grad=True)
        with _OpLog() as log:
            layer(x).sum().backward()
        counts.append([name for name, _ in log.calls])
    assert counts[0] == counts[1]


def _generation_prompts(tok):
    texts = ["the quick", "a lazy do"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"].all(), "prompts must have equal length (no padding)"
    return batch


def test_kv_cache_generation_equals_full_forward_argmax(tiny_model):
    model, tok = tiny_model
    adapter = inject_hmole(model)
    adapter.set_architecture({m: [0, 1, 2, 3] for m in adapter.modules})
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(std=0.5)
    seen_lengths: set[int] = set()
    layer = next(iter(adapter.layers.values()))
    layer.register_forward_hook(lambda mod, args, out: seen_lengths.add(args[0].shape[1]))
    batch = _generation_prompts(tok)
    model.eval()
    with torch.no_grad():
        cached = model.generate(
            **batch,
            max_new_tokens=6,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        ids, full_logits = batch["input_ids"], []
        for _ in range(6):
            full_logits.append(model(input_ids=ids, use_cache=False).logits[:, -1])
            ids = torch.cat([ids, full_logits[-1].argmax(-1, keepdim=True)], dim=1)
    assert 1 in seen_lengths, "decoding should feed one token per step through the KV cache"
    assert torch.equal(cached.sequences, ids)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(full_logits))
    assert adapter.context.records == []


def test_autocast_bf16_runs_adapter_matmuls_in_bf16_with_fp32_master_grads():
    layer = _layer()
    layer.train()
    x = torch.randn(2, 6, layer.in_features)
    layer.context.start_forward(None)
    with _OpLog() as log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            loss = out.float().square().mean() + layer.context.load_balancing_loss()
        loss.backward()
    assert out.dtype == torch.bfloat16
    matmul_dtypes = [dtypes for name, dtypes in log.calls if name in MATMULS]
    assert len(matmul_dtypes) >= 4  # base, projections, mixture; and their backward
    assert all(set(d) == {torch.bfloat16} for d in matmul_dtypes), matmul_dtypes
    for p in (layer.down, layer.up):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert p.grad.abs().sum() > 0


def test_bf16_base_with_fp32_adapters_returns_bf16(tiny_model):
    model, tok = tiny_model
    model.to(torch.bfloat16)
    adapter = inject_hmole(model, dropout=0.05)
    adapter.set_architecture({m: [0, 1, 2] for m in adapter.modules})
    outputs = []
    layer = next(iter(adapter.layers.values()))
    layer.register_forward_hook(lambda mod, args, out: outputs.append(out))
    with torch.no_grad():
        layer.up.normal_()
    model.train()
    batch = tok(["mixed precision"], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss + adapter.load_balancing_loss()
    loss.backward()
    assert outputs[0].dtype == torch.bfloat16
    for p in adapter.trainable_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in adapter.state().values())


def test_state_is_float32_on_cpu_and_load_state_takes_any_dtype(tiny_model):
    model, _ = tiny_model
    adapter = inject_hmole(model)
    adapter.set_architecture({m: [3, 7] for m in adapter.modules})
    gen = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
        for k, v in adapter.state().items()
    }
    adapter.load_state(state)
    loaded = adapter.state()
    for key, tensor in loaded.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32, key
        assert tensor.is_contiguous() and not tensor.requires_grad, key
        torch.testing.assert_close(tensor, state[key].float(), rtol=0, atol=0)
    first = next(iter(loaded))
    loaded[first].add_(1.0)  # a copy: editing it leaves the model alone
    assert not torch.equal(adapter.state()[first], loaded[first])


def test_load_state_names_a_tensor_of_the_wrong_shape(tiny_model):
    model, _ = tiny_model
    adapter = inject_hmole(model, rank=4)
    adapter.set_architecture({m: [0, 1] for m in adapter.modules})
    state = adapter.state()
    key = next(k for k in state if k.endswith("experts.1.lora_B"))
    state[key] = torch.zeros(state[key].shape[0], 8)
    with pytest.raises(ValueError, match=r"experts\.1\.lora_B.*\(64, 8\).*\(64, 4\)"):
        adapter.load_state(state)


def test_adapters_are_created_on_the_base_layers_device():
    model, _ = load_base_model("tiny-random-llama")
    model.to("meta")
    adapter = inject_hmole(model)
    adapter.set_architecture({m: [0, 1] for m in adapter.modules})
    for layer in adapter.layers.values():
        assert layer.down.device.type == layer.up.device.type == "meta"
        assert layer.gate_template.device.type == "meta"
        assert layer.down.dtype == torch.float32


@pytest.mark.gpu
def test_forward_backward_on_cuda_with_and_without_autocast(tiny_model):
    model, tok = tiny_model
    model.to("cuda")
    adapter = inject_hmole(model)
    adapter.set_architecture({m: [0, 2, 5] for m in adapter.modules})
    model.train()
    batch = tok(["on the accelerator", "hi"], return_tensors="pt", padding=True).to("cuda")
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss = loss + 0.001 * adapter.load_balancing_loss()
        loss.backward()
        for p in adapter.trainable_parameters():
            assert p.device.type == "cuda" and p.grad.dtype == torch.float32
            p.grad = None
    state = adapter.state()
    assert all(v.device.type == "cpu" for v in state.values())
    adapter.load_state(state)
