"""Flower records for the codec's arrays and settings (the Message API).

A train message (server -> SuperNode, one per node and round), `message_type="train"`:
    content["model"]         ArrayRecord  the global state, masked weights sparse (once)
    content["config"]        ConfigRecord round, cids (the node's clients, in order), recipe (YAML),
                                          arch (JSON), sparse_shapes
    content["plan.I"]        ArrayRecord  client I's plan tensors (theta_low, ...), bool as bits
    content["plan-config.I"] ConfigRecord client I's plan_class/fields/tensors
Its reply, for each client I of the message:
    content["model.I"]   ArrayRecord  the client's state (sparse) + growth upload
    content["config.I"]  ConfigRecord cid, num_samples, loss, steps, grow_layers, logs
    content["error.I"]   ConfigRecord reason (instead of the two above: that client failed)
    content["metrics"]   MetricRecord num-examples, train_loss (Flower's convention; all clients)
A query message ("query") asks a node for its node_config role (partition-id).
"""

from __future__ import annotations

import numpy as np


def to_array_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v if v.flags.c_contiguous else v.copy(order="C")) for k, v in arrays.items()})


def from_array_record(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_config_record(config: dict):
    from flwr.app import ConfigRecord

    return ConfigRecord({k: v for k, v in config.items()})


def from_config_record(record) -> dict:
    return dict(record.items())
