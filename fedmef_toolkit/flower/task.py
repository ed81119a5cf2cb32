"""The client side of a Flower run: what a SuperNode does with a train message.

A `ClientRuntime` is built once per process from the recipe the server sends
(cached by its digest): the data set and its partition (`data.partition`
with the recipe's seed: the same Dirichlet split as the built-in simulator),
the model skeleton with masks and SAP like the server's, and the same
`ClientTrainer`. Each train message loads the global state into the worker
model and trains one client with the plan the server made for it, drawing
from the same (seed, round, client) random stream as the sequential engine,
so a deterministic CPU run gives the same results as the built-in simulator.
"""

from __future__ import annotations

import json
import os

import torch

from ..data import load_data
from ..data.augment import DeviceAugment
from ..data.partition import partition
from ..fl.client import ClientData, ClientTrainer, client_generator
from ..recipe import parse_yaml, recipe_from_dict
from ..sparse.masks import get_masks
from . import codec


def device_for(recipe) -> torch.device:
    """The recipe's device; FEDMEF_FLOWER_DEVICE (e.g. cuda:1) overrides it on one SuperNode."""
    from ..fl.simulator import resolve_device

    return resolve_device(os.environ.get("FEDMEF_FLOWER_DEVICE") or recipe.device)


class ClientRuntime:
    def __init__(self, recipe, arch_desc: dict):
        self.recipe = recipe
        self.device = device_for(recipe)
        torch.manual_seed(recipe.seed)
        self.data = load_data(recipe.data, recipe.eval.split, recipe.seed)
        d = recipe.data
        parts = partition(self.data.train_y.numpy(), d.partition, d.num_clients, d.alpha, d.min_samples, recipe.seed)
        self.client_indices = [torch.from_numpy(p).to(torch.int64) for p in parts]
        self.arch_desc = arch_desc
        self.worker = None
        mean, std = self.data.channel_stats()
        self.augment = DeviceAugment(mean, std, enabled=d.augment).to(self.device)
        self.train_x = self.data.train_x.to(self.device)
        self.train_y = self.data.train_y.to(self.device)
        fl = recipe.fl
        self.trainer = ClientTrainer(self.train_x, self.train_y, self.augment, epochs=fl.local_epochs,
                                     batch_size=fl.batch_size, momentum=fl.momentum,
                                     weight_decay=fl.weight_decay, precision=recipe.precision,
                                     cuda_graphs=recipe.cuda_graphs, agc=fl.agc,
                                     channels_last=recipe.channels_last)

    def build_worker(self, state: dict) -> torch.nn.Module:
        from ..architecture import build_for_state, build_from_description
        from ..fl.strategies import build_strategy

        desc = self.arch_desc
        if desc.get("kind") == "converted":
            model = build_for_state(desc, {k: tuple(v.shape) for k, v in state.items()}, "<server>")
        else:
            model = build_from_description(desc)
        model = model.to(self.device)
        build_strategy(self.recipe).setup(model, self.recipe.seed)  # mask buffers (values come with the state)
        if self.recipe.method.sap.enabled:
            from ..sap import enable_sap

            enable_sap(model, self.recipe.method.sap.gamma, self.recipe.method.sap.selection)
        return model

    def train(self, t: int, cid: int, state_arrays: dict, state_config: dict, plan_arrays: dict,
              plan_config: dict):
        if not 0 <= cid < len(self.client_indices):
            raise ValueError(f"client {cid} is not one of the recipe's {len(self.client_indices)} clients")
        state = codec.decode_state(state_arrays, state_config, self.device)
        if self.worker is None:
            self.worker = self.trainer.prepare_worker(self.build_worker(state))
        self.worker.load_state_dict(state)
        plan = codec.decode_plan(plan_arrays, plan_config, get_masks(self.worker), self.device)
        client = ClientData(cid, self.client_indices[cid].to(self.device))
        gen = client_generator(self.recipe.seed, t, cid, self.device)
        return self.trainer.train(self.worker, client, plan, gen)


_RUNTIMES: dict[str, ClientRuntime] = {}  # per process: one data set and model per recipe


def runtime_for(recipe_yaml: str, arch_json: str) -> ClientRuntime:
    key = recipe_yaml + "\0" + arch_json
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one recipe at a time: free the previous one's data
        recipe = recipe_from_dict(parse_yaml(recipe_yaml, "<server recipe>"), "<server recipe>")
        _RUNTIMES[key] = ClientRuntime(recipe, json.loads(arch_json))
    return _RUNTIMES[key]
