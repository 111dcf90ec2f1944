"""Each client's personalised model, as its method evaluated it: loaded from a run
(:mod:`fedamole.serving.personalised`), exported as a folder that needs no run
(:mod:`fedamole.serving.export`), or served over HTTP with the other clients on one backbone
(``fedamole serve``: :mod:`fedamole.serving.server`). Nothing here imports Flower."""

from fedamole.serving.export import ExportError, export_client, load_pretrained
from fedamole.serving.personalised import ClientModel, load_client_model

__all__ = ["ClientModel", "ExportError", "export_client", "load_client_model", "load_pretrained"]
