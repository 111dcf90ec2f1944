"""Each client's personalised model, as its method evaluated it: loaded from a run or from a
folder that needs no run (:mod:`fedamole.serving.loading`), exported as such a folder
(:mod:`fedamole.serving.export`), or served over HTTP with the other clients on one backbone
(``fedamole serve``: :mod:`fedamole.serving.server`). Nothing here imports Flower. The names
below load lazily, so the command line reads :mod:`fedamole.serving.settings` without loading
any model code."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedamole.serving.export import export_client
    from fedamole.serving.loading import ExportError, load_client_model, load_pretrained
    from fedamole.serving.personalised import ClientModel

_LAZY = {
    "ClientModel": "fedamole.serving.personalised",
    "ExportError": "fedamole.serving.loading",
    "export_client": "fedamole.serving.export",
    "load_client_model": "fedamole.serving.loading",
    "load_pretrained": "fedamole.serving.loading",
}

__all__ = ["ClientModel", "ExportError", "export_client", "load_client_model", "load_pretrained"]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'fedamole.serving' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)
