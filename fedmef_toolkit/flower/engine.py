"""The server side on Flower: an engine that sends a round's clients to SuperNodes.

`FlowerEngine.run_round` has the signature of the built-in engines, so the
Simulator (the strategy's driver: sampling, plans, aggregation, mask
changes, accounting, checkpoints, evaluation, run directory) is unchanged.
A round sends one train message per node, naming the node's clients (they train one after the
other in that node's ClientApp, with the model sent once): Flower 1.42's deployment engine starts a
ClientApp process per message, so a message per client would pay that start per client.
Which node trains which client:

- a node whose node config holds `partition-id` and `num-partitions` equal to
  the recipe's `data.num_clients` (Flower's simulation engine sets both;
  `flower-supernode --node-config "partition-id=3 num-partitions=100"` on a
  real device) owns that client's data and trains only that client;
- a node without it is a worker (one SuperNode per GPU) and trains any
  client the server names, loading that client's partition of the data.

A stop requested by SIGINT or SIGTERM (`fedmef_toolkit.interrupts`) abandons the round while
its clients train: `run_round` raises `Interrupted` and the Simulator checkpoints the last
completed round.

Faults: a node that replies with an error, disappears, or misses
`fl.flower.timeout_s` loses its client for the round; the round aggregates
the results that came back when there are at least `fl.flower.min_results`,
and `round_log()` puts the failures into metrics.jsonl.
"""

from __future__ import annotations

import json
import time

from .. import interrupts
from ..errors import UserError
from . import codec
from .messages import from_array_record, from_config_record, to_array_record, to_config_record


class TooFewResults(UserError):
    pass


class FlowerEngine:
    poll_s = 0.05
    liveness_every_s = 2.0

    def __init__(self, recipe, arch_desc: dict, seed: int):
        self.recipe = recipe
        self.seed = seed
        self.recipe_yaml = None
        self.arch_json = json.dumps(arch_desc)
        self.grid = None  # attached by the ServerApp (server_app.py / simulation.py)
        self.roles: dict[int, int | None] = {}  # node id -> owned partition (None: worker)
        self.log: dict = {}
        self.rounds_done = 0

    # -- nodes ----------------------------------------------------------------
    def wait_for_nodes(self, count: int, timeout_s: float) -> None:
        end = time.time() + timeout_s
        while len(list(self.grid.get_node_ids())) < count:
            interrupts.check()
            if time.time() > end:
                raise UserError(f"Flower: {len(list(self.grid.get_node_ids()))} of {count} SuperNodes connected "
                                f"after {timeout_s:.0f} s")
            time.sleep(0.1)

    def _discover(self) -> list[int]:
        from flwr.app import Message, RecordDict

        nodes = sorted(self.grid.get_node_ids())
        new = [n for n in nodes if n not in self.roles]
        if new:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in new]
            for reply in self.grid.send_and_receive(msgs, timeout=60):
                if reply.has_error():
                    continue
                cfg = reply.content["config"]
                pid, num = int(cfg["partition-id"]), int(cfg["num-partitions"])
                owner = 0 <= pid < num == self.recipe.data.num_clients
                self.roles[reply.metadata.src_node_id] = pid if owner else None
        return [n for n in nodes if n in self.roles]

    def _route(self, cids: list[int], nodes: list[int]) -> dict[int, int | None]:
        owners = {p: n for n, p in self.roles.items() if p is not None and n in nodes}
        workers = [n for n in nodes if self.roles.get(n) is None]
        route, w = {}, 0
        for cid in cids:
            if cid in owners:
                route[cid] = owners[cid]
            elif workers:
                route[cid] = workers[(self.rounds_done + w) % len(workers)]
                w += 1
            else:
                route[cid] = None
        return route

    # -- one round --------------------------------------------------------------
    def run_round(self, t, global_model, clients, make_plan):
        from flwr.app import Message, RecordDict

        from ..recipe import recipe_to_yaml
        from ..sparse.masks import get_masks

        if self.recipe_yaml is None:
            self.recipe_yaml = recipe_to_yaml(self.recipe)
        fcfg = self.recipe.fl.flower
        state = global_model.state_dict()
        state_arrays, state_cfg = codec.encode_state(state)
        masks = get_masks(global_model)
        nodes = self._discover()
        route = self._route([c.cid for c in clients], nodes)
        failed: dict[int, str] = {}
        pending: dict[str, tuple[int, list[int]]] = {}  # message id -> (node, its clients)
        down = 0
        batches: dict[int, list[tuple[int, dict, dict]]] = {}  # node -> [(cid, plan arrays, plan config)]
        for client in clients:  # plans in the clients' order (as the built-in engines make them)
            node = route[client.cid]
            plan_arrays, plan_cfg = codec.encode_plan(make_plan(), masks)
            if node is None:
                failed[client.cid] = "no SuperNode can train this client"
                continue
            batches.setdefault(node, []).append((client.cid, plan_arrays, plan_cfg))
        msgs, meta = [], []
        for node, batch in batches.items():
            # one message per node and round: its clients train one after the other in one ClientApp
            # process (Flower 1.42 starts a process per message), the global model travels once
            cfg = {"round": t, "cids": [cid for cid, _, _ in batch], "recipe": self.recipe_yaml,
                   "arch": self.arch_json}
            cfg.update(state_cfg)
            content = RecordDict({"model": to_array_record(state_arrays), "config": to_config_record(cfg)})
            down += codec.arrays_bytes(state_arrays)
            for i, (_, plan_arrays, plan_cfg) in enumerate(batch):
                content[f"plan.{i}"] = to_array_record(plan_arrays)
                content[f"plan-config.{i}"] = to_config_record(plan_cfg)
                down += codec.arrays_bytes(plan_arrays)
            msgs.append(Message(content, dst_node_id=node, message_type="train", group_id=str(t)))
            meta.append((node, cfg["cids"]))
        for mid, m in zip(self.grid.push_messages(msgs), meta):
            pending[mid] = m
        results, up = {}, 0
        deadline = time.time() + fcfg.timeout_s if fcfg.timeout_s > 0 else None
        next_check = time.time() + self.liveness_every_s
        device = next(global_model.parameters()).device
        while pending:
            # a signal stops the run here (interrupts.py: Flower's ServerApp runs in a thread of its
            # own); the global model is still that of the last completed round, which is checkpointed
            interrupts.check()
            for reply in self.grid.pull_messages(list(pending)):
                node, cids = pending.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    failed.update({cid: f"node {node}: {_short(reply.error.reason)}" for cid in cids})
                    continue
                for i, cid in enumerate(cids):
                    try:
                        if f"error.{i}" in reply.content:
                            failed[cid] = f"node {node}: {_short(str(reply.content[f'error.{i}']['reason']))}"
                            continue
                        arrays = from_array_record(reply.content[f"model.{i}"])
                        results[cid] = codec.decode_result(arrays, from_config_record(reply.content[f"config.{i}"]),
                                                           device)
                        up += codec.arrays_bytes(arrays)
                    except Exception as exc:  # a malformed reply is that client's failure
                        failed[cid] = f"node {node}: bad reply ({type(exc).__name__}: {_short(str(exc))})"
            if not pending:
                break
            now = time.time()
            if deadline is not None and now > deadline:
                for node, cids in pending.values():
                    failed.update({cid: f"node {node}: no reply within fl.flower.timeout_s={fcfg.timeout_s:g}"
                                   for cid in cids})
                break
            if now > next_check:
                alive = set(self.grid.get_node_ids())
                for mid, (node, cids) in list(pending.items()):
                    if node not in alive:
                        failed.update({cid: f"node {node}: disconnected" for cid in cids})
                        pending.pop(mid)
                        self.roles.pop(node, None)
                next_check = now + self.liveness_every_s
            time.sleep(self.poll_s)
        self.rounds_done += 1
        ordered = [results[c.cid] for c in clients if c.cid in results]
        self.log = {"wire_bytes_down": down, "wire_bytes_up": up}
        if failed:
            self.log["failed_clients"] = {str(c): why for c, why in sorted(failed.items())}
        if len(ordered) < fcfg.min_results:
            raise TooFewResults(f"round {t}: {len(ordered)} of {len(clients)} clients returned results, fewer than "
                                f"fl.flower.min_results={fcfg.min_results}; failures: {self.log.get('failed_clients')}")
        return ordered

    def round_log(self) -> dict:
        return self.log

    def status(self) -> str:
        n = len(self.roles)
        owners = sum(1 for p in self.roles.values() if p is not None)
        return f"Flower engine: {n} SuperNodes ({owners} own a partition, {n - owners} workers)"


def _short(text: str, limit: int = 300) -> str:
    """One line; long reasons (Ray wraps the ClientApp's exception) keep their start and their end,
    where the exception's own message is."""
    text = " ".join(str(text).replace("\x1b", "").split())
    return text if len(text) <= limit else text[:80] + " ... " + text[-(limit - 85):]
