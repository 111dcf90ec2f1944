"""fedamole: personalised federated fine-tuning of LLMs with heterogeneous mixtures of LoRA experts.

The models a run produces, ready to answer:

- ``fedamole.load_client_model(run_dir, client_id)``: a client's model from a finished run;
- ``fedamole.load_pretrained(folder)``: a model exported with ``fedamole export``;

both give a :class:`fedamole.serving.ClientModel` (``.model``, ``.tokenizer``,
``.generate(...)``). They load lazily, so ``import fedamole`` stays light.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING

# transformers imports torchao whenever it is installed (the `quant` extra); torchao then logs a
# warning for each of its CUDA-only kernels that cannot load on a CPU machine, and torch one per
# enum torchao registers. Neither concerns a run, so every fedamole process starts without them.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

if TYPE_CHECKING:
    from fedamole.serving.loading import load_client_model, load_pretrained
    from fedamole.serving.personalised import ClientModel

_LAZY = {
    "ClientModel": "fedamole.serving.personalised",
    "load_client_model": "fedamole.serving.loading",
    "load_pretrained": "fedamole.serving.loading",
}

__all__ = ["ClientModel", "load_client_model", "load_pretrained"]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'fedamole' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)
