"""The fedamole ClientApp: one organisation's SuperNode says who it is, trains its rounds and
evaluates the aggregated model for methods that serve it.

Node config (``flower-supernode --node-config``): ``partition-id`` (this client's id),
``num-partitions`` (the number of clients), optionally ``data-path``, the organisation's own
data file (without it the client takes its partition of the configured, shared source, exactly as
the in-process transport would), and optionally ``state-dir``, where the node keeps its private
tensors and its personalised model (default: ``$FEDAMOLE_CACHE/nodes``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedamole.transports.flower.node_config import NUM_PARTITIONS, PARTITION_ID
from fedamole.transports.flower.records import asks_for_base_scores, identity_to_record

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is, so it can send the right payload; or, asked
    with the run (``eval.base_model``), score the frozen base model on this client's test split."""
    node = context.node_config
    if asks_for_base_scores(msg.content):
        from fedamole.transports.flower.node import base_scores_reply

        return Message(base_scores_reply(msg.content, node), reply_to=msg)
    return Message(
        identity_to_record(int(node[PARTITION_ID]), int(node[NUM_PARTITIONS])), reply_to=msg
    )


# The jobs are imported inside the handlers: every message runs in a fresh process, and the
# identity query should not pay the seconds it takes to import torch and transformers.
@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local work: download -> train -> (evaluate, embed) -> upload."""
    from fedamole.transports.flower.node import train_reply

    return Message(train_reply(msg.content, context.node_config), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The aggregated model (plus this client's private part) on this client's own splits."""
    from fedamole.transports.flower.node import evaluate_reply

    return Message(evaluate_reply(msg.content, context.node_config), reply_to=msg)
