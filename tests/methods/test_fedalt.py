"""FedALT on the tiny random Llama: each client's Rest-of-World LoRA is the mean of the *other*
clients' individual LoRAs and never learns; the individual LoRA is the client's own, never an
aggregate; the router mixes the two per token and never leaves the client."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_methods import TINY, Federation, federation  # sibling module: the same stepping harness
from tiny_run import TINY_RUN

from fedamole.config import ConfigError, load_config
from fedamole.methods.fedalt import LOCAL, ROUTER, ROW, FedALT, RoutedLoraHandle
from fedamole.models import build_base_model
from fedamole.serving import export_client, load_client_model
from fedamole.serving.personalised import request_examples
from fedamole.transports.in_process import run_in_process


def local_keys(fed: Federation) -> list[str]:
    return [k for k in fed.handle.params if k.startswith(f"{LOCAL}/")]


def as_row(key: str) -> str:
    return f"{ROW}/{key.removeprefix(f'{LOCAL}/')}"


def private_of(fed: Federation, client: int, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in fed.clients[client].private.items() if k.startswith(f"{prefix}/")}


def test_rest_of_world_is_the_mean_of_the_other_clients_and_gets_no_gradient():
    fed = federation("fedalt")
    first = fed.method.payload(fed.state, 0).weights
    assert set(first) == {as_row(k) for k in local_keys(fed)}
    assert all(not v.any() for k, v in first.items() if ".lora_B." in k)  # adds nothing yet

    updates = fed.play()
    for c in range(3):
        row = fed.method.payload(fed.state, c).weights
        for key in local_keys(fed):
            others = [u.weights[key] for u in updates if u.client_id != c]
            torch.testing.assert_close(row[as_row(key)], torch.stack(others).mean(0))
    assert not torch.equal(*(fed.method.payload(fed.state, c).weights[as_row(key)] for c in (0, 1)))

    routers = private_of(fed, 0, ROUTER)
    payload = fed.method.payload(fed.state, 0)
    fed.method.client_round(payload, fed.clients[0])  # round 1: the RoW is no longer zero
    row_params = {k: p for k, p in fed.handle.params.items() if k.startswith(f"{ROW}/")}
    assert all(p.grad is None and not p.requires_grad for p in row_params.values())
    assert all(torch.equal(p.detach(), payload.weights[k]) for k, p in row_params.items())
    trained = private_of(fed, 0, ROUTER)
    assert all(not torch.equal(trained[k], routers[k]) for k in routers)  # the router learnt


def test_the_individual_lora_is_the_clients_own_and_training_continues_from_it():
    fed = federation("fedalt")
    updates = fed.play()
    for update in updates:  # kept as trained, not replaced by any aggregate
        kept = private_of(fed, update.client_id, LOCAL)
        assert kept.keys() == update.weights.keys()
        assert all(torch.equal(kept[k], update.weights[k]) for k in kept)
    assert not torch.equal(*(u.weights[local_keys(fed)[-1]] for u in updates[:2]))

    fed.evaluate(1)  # after aggregation: own LoRA and router, the server's new RoW
    loaded = fed.handle.state()
    assert all(torch.equal(loaded[k], v) for k, v in fed.clients[1].private.items())
    second = fed.method.client_round(fed.method.payload(fed.state, 1), fed.clients[1])
    moved = [k for k in second.weights if not torch.equal(second.weights[k], updates[1].weights[k])]
    assert moved  # round 1 trained on from the client's own round-0 LoRA


def test_the_router_never_leaves_the_client():
    fed = federation("fedalt")
    updates = fed.play()
    assert all(set(u.weights) == set(local_keys(fed)) for u in updates)
    assert not any(ROUTER in k for k in fed.state.store)
    assert not any(ROUTER in k for k in fed.method.payload(fed.state, 0).weights)
    routers = [private_of(fed, c, ROUTER) for c in range(2)]
    assert routers[0] and not torch.equal(*(r[next(iter(r))] for r in routers))
    assert fed.method.shares_personal_model is False
    assert set(routers[0]) <= set(fed.method.personal_model(fed.clients[0]))


def test_clients_that_have_not_uploaded_contribute_nothing():
    fed = federation("fedalt")
    update = fed.play([fed.clients[0]])[0]
    for key in local_keys(fed):
        torch.testing.assert_close(
            fed.method.payload(fed.state, 2).weights[as_row(key)], update.weights[key]
        )
    own = fed.method.payload(fed.state, 0).weights  # no one else yet: the zero-effect init
    assert all(not v.any() for k, v in own.items() if ".lora_B." in k)


def test_each_token_mixes_the_two_loras_by_the_routers_softmax():
    fed = federation("fedalt")
    fed.play()
    handle: RoutedLoraHandle = fed.handle
    handle.load({**fed.clients[0].private, **fed.method.payload(fed.state, 0).weights})
    layer = handle.layers[0]
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    handle.model.eval()
    with torch.no_grad(), handle.mixing({LOCAL: 1.0, ROW: 1.0}):
        handle.model(input_ids=ids)
    hook.remove()

    x = seen["x"]
    gates = torch.softmax(x @ layer.lora_A[ROUTER].weight.T, dim=-1)
    assert not torch.allclose(gates[..., 0], gates[..., 1])  # the tokens are weighted
    expected = layer.base_layer(x)
    for i, adapter in enumerate((LOCAL, ROW)):
        delta = layer.lora_B[adapter](layer.lora_A[adapter](x)) * layer.lora_alpha[adapter]
        expected = expected + gates[..., i : i + 1] * delta / layer.r[adapter]
    torch.testing.assert_close(seen["out"], expected)


def test_weighted_aggregation_is_refused_naming_the_setting():
    cfg = load_config(None, [*TINY, "federation.weighted_aggregation=true"])
    with pytest.raises(ConfigError, match="federation.weighted_aggregation"):
        FedALT().check(cfg)


def test_an_export_holds_the_whole_client_model_in_peft_adapters(tmp_path):
    """The two LoRAs and the router are PEFT adapters of the export: loaded with PEFT and mixed
    by FedALT's handle they give the logits of the model the run saved."""
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY_RUN, "model.device=cpu", "optim.lr=0.02", f"output.dir={run}"])
    run_in_process(cfg, method="fedalt")
    saved = load_client_model(run, 1, device="cpu")
    folder = export_client(run, 1, tmp_path / "export").folder

    base, _ = build_base_model(cfg)
    model = PeftModel.from_pretrained(base, folder / LOCAL, adapter_name=LOCAL)
    for adapter in (ROW, ROUTER):
        model.load_adapter(folder / adapter, adapter_name=adapter)
    exported = RoutedLoraHandle(model.eval())
    prompt = request_examples("Name a colour.")
    ids = torch.tensor([saved.prompter.prompt_ids(prompt[0])])
    ((answering, _),) = saved.answer_rule(prompt)
    with torch.no_grad():
        with answering:
            expected = saved.model(input_ids=ids).logits
        with exported.mixing({LOCAL: 1.0, ROW: 1.0}):
            torch.testing.assert_close(model(input_ids=ids).logits, expected)
