"""Names of the tensors that make up HMoLE state.

Every piece of expert state, on a client, on the server and on the wire, is a flat
``dict[str, Tensor]`` keyed by these names, so safetensors, Flower records and the aggregation
all share one format:

- ``{module}.experts.{e}.lora_A`` (r x d_in) and ``...lora_B`` (d_out x r): domain expert e
- ``{module}.shared.lora_A`` / ``{module}.shared.lora_B``: the shared expert
- ``{module}.router.weight`` (r x d_in): the token projection W_tok
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["expert", "shared", "router"]

_KEY = re.compile(
    r"^(?P<module>.+)\.(?:experts\.(?P<expert>\d+)\.lora_(?P<epart>[AB])"
    r"|shared\.lora_(?P<spart>[AB])|router\.weight)$"
)


def expert_key(module: str, expert: int, part: Literal["A", "B"]) -> str:
    return f"{module}.experts.{expert}.lora_{part}"


def shared_key(module: str, part: Literal["A", "B"]) -> str:
    return f"{module}.shared.lora_{part}"


def router_key(module: str) -> str:
    return f"{module}.router.weight"


@dataclass(frozen=True)
class KeyInfo:
    module: str
    kind: Kind
    expert: int | None = None
    part: Literal["A", "B"] | None = None


def parse_key(key: str) -> KeyInfo:
    match = _KEY.match(key)
    if match is None:
        raise KeyError(f"not an HMoLE state key: {key!r}")
    if match["expert"] is not None:
        return KeyInfo(match["module"], "expert", int(match["expert"]), match["epart"])
    if match["spart"] is not None:
        return KeyInfo(match["module"], "shared", None, match["spart"])
    return KeyInfo(match["module"], "router")


def state_keys(architecture: dict[str, list[int]]) -> list[str]:
    """Every tensor a client with this architecture holds: its experts, the shared expert, the router."""
    keys: list[str] = []
    for module, experts in architecture.items():
        keys += [expert_key(module, e, part) for e in experts for part in ("A", "B")]
        keys += [shared_key(module, "A"), shared_key(module, "B"), router_key(module)]
    return keys
