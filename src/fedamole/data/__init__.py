"""Data: sources, synthetic tasks, client partitions, per-client splits, prompts, tokenisation."""

from fedamole.data.example import DataError, Example
from fedamole.data.partition import client_groups, partition_examples
from fedamole.data.prompts import render_prompt, render_response
from fedamole.data.sources import load_source
from fedamole.data.splits import ClientSplits, split_client
from fedamole.data.synthetic import generate_synthetic
from fedamole.data.tokenize import collate, encode_example, encode_split

__all__ = [
    "ClientSplits",
    "DataError",
    "Example",
    "client_groups",
    "collate",
    "encode_example",
    "encode_split",
    "generate_synthetic",
    "load_source",
    "partition_examples",
    "render_prompt",
    "render_response",
    "split_client",
]
