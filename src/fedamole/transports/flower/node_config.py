"""What an organisation sets on its SuperNode (``flower-supernode --node-config``) and where the
node keeps its files. Free of Flower imports: loading a client model from a run names these
without importing the Flower stack."""

from __future__ import annotations

from pathlib import Path

from fedamole.models import model_cache_dir

PARTITION_ID = "partition-id"  # this node's client id, 0 .. num-partitions - 1
NUM_PARTITIONS = "num-partitions"  # must equal federation.num_clients
DATA_PATH = "data-path"  # optional: the organisation's own data file instead of a partition
STATE_DIR = "state-dir"  # optional: where the node keeps private tensors and its own model
MODEL_FOLDER = "model"  # <state-dir>/<run id>/client<id>/model/: the client's personalised model


def default_state_dir() -> Path:
    """``$FEDAMOLE_CACHE/nodes`` (default ~/.cache/fedamole/nodes)."""
    return model_cache_dir() / "nodes"


def node_client_folder(state_dir: Path, run_id: str, client_id: int) -> Path:
    """This run's private files of one client on its node."""
    return state_dir / run_id / f"client{client_id}"
