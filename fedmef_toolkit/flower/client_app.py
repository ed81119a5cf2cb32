"""The Flower ClientApp: trains the client a train message names (see engine.py, task.py).

`flwr run` loads it as `fedmef_toolkit.flower.client_app:app`. A SuperNode's
node config may hold `partition-id` (it then owns that client); the device is
the recipe's, or FEDMEF_FLOWER_DEVICE on that node.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .messages import from_array_record, from_config_record, to_array_record, to_config_record

app = ClientApp()

FAULT_ENV = "FEDMEF_FLOWER_FAULT"  # tests: "ROUND:CID[:exit]" makes that client fail (or its process exit)


def _partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config; (-1, 0) where absent. The server
    treats a node as the owner of one client's data only when num-partitions equals the
    recipe's data.num_clients; otherwise the node is a worker that trains any client."""
    pid = context.node_config.get("partition-id")
    num = context.node_config.get("num-partitions")
    return (-1 if pid is None else int(pid)), (0 if num is None else int(num))


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid, num = _partition_of(context)
    return Message(RecordDict({"config": ConfigRecord({"partition-id": pid, "num-partitions": num})}),
                   reply_to=msg)


def _inject_fault(t: int, cid: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        if int(parts[0]) == t and int(parts[1]) == cid:
            if len(parts) > 2 and parts[2] == "exit":
                os._exit(17)
            raise RuntimeError(f"injected fault for client {cid} in round {t}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    from . import codec  # torch, data and models: not needed to answer a query
    from .task import runtime_for

    cfg = from_config_record(msg.content["config"])
    t, cid = int(cfg["round"]), int(cfg["cid"])
    _inject_fault(t, cid)
    rt = runtime_for(cfg["recipe"], cfg["arch"])
    pid, num = _partition_of(context)
    if num == rt.recipe.data.num_clients and pid != cid:
        raise ValueError(f"this SuperNode owns client {pid}'s data, not client {cid}'s")
    result = rt.train(t, cid, from_array_record(msg.content["model"]), cfg,
                      from_array_record(msg.content["plan"]), cfg)
    arrays, out_cfg = codec.encode_result(result)
    content = RecordDict({"model": to_array_record(arrays), "config": to_config_record(out_cfg),
                          "metrics": MetricRecord({"num-examples": result.num_samples, "train_loss": result.loss})})
    return Message(content, reply_to=msg)
