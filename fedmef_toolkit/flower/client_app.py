"""The Flower ClientApp: trains the client a train message names (see engine.py, task.py).

`flwr run` loads it as `fedmef_toolkit.flower.client_app:app`. A SuperNode's
node config may hold `partition-id` (it then owns that client); the device is
the recipe's, or FEDMEF_FLOWER_DEVICE on that node.
"""

from __future__ import annotations

import json
import os
import time

_T_IMPORT = time.time()  # this module's import: the ClientApp process is (re)started per message in 1.42

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .messages import from_array_record, from_config_record, to_array_record, to_config_record

app = ClientApp()

FAULT_ENV = "FEDMEF_FLOWER_FAULT"  # tests: "ROUND:CID[:exit]" makes that client fail (or its process exit)
TRACE_ENV = "FEDMEF_FLOWER_TRACE"  # a file: one JSON line of timestamps per train message (benchmarks)


def _process_start() -> float | None:
    """This process's start time (Unix seconds; Linux), for the trace."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


def _trace(**row) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        row.update(pid=os.getpid(), proc_start=_process_start(), module_import=_T_IMPORT)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


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
    """Trains the clients the message names (`cids`), one after the other, each from the global
    model with its own plan and (seed, round, client) generator; a client that fails is an
    `error.I` record of the reply, the others' results still go back."""
    t0 = time.time()
    from . import codec  # torch, data and models: not needed to answer a query
    from .task import runtime_for

    cfg = from_config_record(msg.content["config"])
    t, cids = int(cfg["round"]), [int(c) for c in cfg["cids"]]
    t1 = time.time()
    rt = runtime_for(cfg["recipe"], cfg["arch"])
    t2 = time.time()
    pid, num = _partition_of(context)
    state_arrays = from_array_record(msg.content["model"])
    content = RecordDict()
    samples, loss = 0, 0.0
    for i, cid in enumerate(cids):
        s0 = time.time()
        try:
            _inject_fault(t, cid)
            if num == rt.recipe.data.num_clients and pid != cid:
                raise ValueError(f"this SuperNode owns client {pid}'s data, not client {cid}'s")
            result = rt.train(t, cid, state_arrays, cfg, from_array_record(msg.content[f"plan.{i}"]),
                              from_config_record(msg.content[f"plan-config.{i}"]))
        except Exception as exc:  # noqa: BLE001 - that client's failure, reported to the server
            content[f"error.{i}"] = ConfigRecord({"reason": f"{type(exc).__name__}: {exc}"})
            continue
        s1 = time.time()
        arrays, out_cfg = codec.encode_result(result)
        content[f"model.{i}"] = to_array_record(arrays)
        content[f"config.{i}"] = to_config_record(out_cfg)
        samples, loss = samples + result.num_samples, loss + result.loss * result.num_samples
        _trace(round=t, cid=cid, node=context.node_id, enter=t0, imported=t1, runtime=t2, start=s0, trained=s1,
               done=time.time())
    content["metrics"] = MetricRecord({"num-examples": samples, "train_loss": loss / max(samples, 1)})
    return Message(content, reply_to=msg)
