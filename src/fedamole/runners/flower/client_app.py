"""The FedAMoLE ClientApp: one organisation's SuperNode answers who it is and trains its rounds.

Node config (``flower-supernode --node-config``): ``partition-id`` (this client's id),
``num-partitions`` (the number of clients) and optionally ``data-path``, the organisation's own
data file; without it the client takes its partition of the configured (shared) source, exactly
as the in-process runner would.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedamole.runners.flower.records import identity_to_record
from fedamole.runners.flower.settings import NUM_PARTITIONS, PARTITION_ID

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is, so it can send the right experts."""
    node = context.node_config
    return Message(
        identity_to_record(int(node[PARTITION_ID]), int(node[NUM_PARTITIONS])), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One FedAMoLE round: download -> train -> evaluate -> RSEA embeddings -> upload."""
    # Imported here: every message runs in a fresh process, and the identity query should not
    # pay the seconds it takes to import torch and transformers.
    from fedamole.runners.flower.client_round import train_reply

    return Message(train_reply(msg.content, context.node_config), reply_to=msg)
