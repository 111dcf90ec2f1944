"""Names of the tensors that make up HMoLE state.

Every piece of expert state, on a client, on the server and on the wire, is a flat
``dict[str, Tensor]`` keyed by these names, so safetensors, Flower records and the aggregation
all share one format:

- ``{module}.experts.{e}.lora_A`` (r x d_in) and ``...lora_B`` (d_out x r): domain expert e
- ``{module}.shared.lora_A`` / ``{module}.shared.lora_B``: the shared expert
- ``{module}.router.weight`` (r x d_in): the token projection W_tok
"""

from __future__ import annotations

from typing import Literal


def expert_key(module: str, expert: int, part: Literal["A", "B"]) -> str:
    return f"{module}.experts.{expert}.lora_{part}"


def shared_key(module: str, part: Literal["A", "B"]) -> str:
    return f"{module}.shared.lora_{part}"


def router_key(module: str) -> str:
    return f"{module}.router.weight"


def state_keys(architecture: dict[str, list[int]]) -> list[str]:
    """Every tensor a client with this architecture holds: its experts, the shared expert, the router."""
    keys: list[str] = []
    for module, experts in architecture.items():
        keys += [expert_key(module, e, part) for e in experts for part in ("A", "B")]
        keys += [shared_key(module, "A"), shared_key(module, "B"), router_key(module)]
    return keys
