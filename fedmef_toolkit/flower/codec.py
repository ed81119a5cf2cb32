"""What travels between the server and a Flower client, as plain arrays and scalars.

Pure torch/numpy (no Flower import): `messages.py` wraps these dicts into
Flower records. The layout is the one communication accounting counts
(fl/comm.py), so the bytes of the arrays that travel equal `bytes_down` and
`bytes_up` (tests check it):

- a model state: each masked weight as its active values (`<key>` holds
  values[mask]) plus its mask, packed as a bitmask (`<key>@bits`, uint8) or as
  int32 flat indices (`<key>@idx`), whichever is smaller; every other tensor
  dense. Entries outside a mask are 0 by the toolkit's invariant (masked SGD
  zeroes them), so decoding is exact.
- a client plan: its class and scalar settings in the config; its tensors as
  arrays. Boolean tensors travel as packed bitmasks. FedMef's growth request
  (k_l, candidates = ~mask | theta_low) is rebuilt on the client from theta_low
  and the model's mask, so only theta_low's bitmask travels (what
  `FedMef.download_bytes` counts).
- a client result: its state as above, the growth upload as int32 indices and
  float values (`grow.<layer>.idx` / `.val`), loss, steps, logs in the config.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import torch

from ..sparse.masks import MASK_SUFFIX

BITS, IDX = "@bits", "@idx"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()  # keeps 0-dim tensors 0-dim


def pack_bool(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(_np(mask.to(torch.bool)).reshape(-1))


def unpack_bool(bits: np.ndarray, shape) -> torch.Tensor:
    numel = int(np.prod(shape)) if len(shape) else 1
    return torch.from_numpy(np.unpackbits(bits, count=numel).astype(bool)).view(tuple(shape))


# -- model states ----------------------------------------------------------

def encode_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, config) of a model state, masked weights sparse."""
    arrays: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    for key, t in state.items():
        if key.endswith(MASK_SUFFIX):
            continue
        mask = state.get(key[: -len("weight")] + MASK_SUFFIX) if key.endswith("weight") else None
        if mask is None:
            arrays[key] = _np(t)
            continue
        flat, m = t.detach().reshape(-1), mask.reshape(-1).to(torch.bool)
        arrays[key] = _np(flat[m])
        shapes[key] = list(t.shape)
        nnz = int(arrays[key].size)
        if nnz * 4 < (m.numel() + 7) // 8:
            arrays[key + IDX] = _np(torch.nonzero(m).reshape(-1).to(torch.int32))
        else:
            arrays[key + BITS] = pack_bool(m)
    return arrays, {"sparse_shapes": json.dumps(shapes)}


def decode_state(arrays: dict[str, np.ndarray], config: dict, device=None) -> dict[str, torch.Tensor]:
    shapes = json.loads(config["sparse_shapes"])
    out: dict[str, torch.Tensor] = {}
    for key, arr in arrays.items():
        if key.endswith(BITS) or key.endswith(IDX):
            continue
        t = torch.from_numpy(np.array(arr))
        if key not in shapes:
            out[key] = t.to(device) if device is not None else t
            continue
        shape = shapes[key]
        numel = int(np.prod(shape))
        if key + IDX in arrays:
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[torch.from_numpy(np.array(arrays[key + IDX])).to(torch.int64)] = True
            mask = mask.view(shape)
        else:
            mask = unpack_bool(arrays[key + BITS], shape)
        dense = torch.zeros(numel, dtype=t.dtype)
        dense[mask.reshape(-1)] = t
        out[key] = dense.view(shape)
        out[key[: -len("weight")] + MASK_SUFFIX] = mask
        if device is not None:
            out[key] = out[key].to(device)
            out[key[: -len("weight")] + MASK_SUFFIX] = mask.to(device)
    return out


def arrays_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


# -- client plans ------------------------------------------------------------

ALLOWED_PREFIX = "fedmef_toolkit."


def _class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(path: str):
    module, _, name = path.partition(":")
    if not module.startswith(ALLOWED_PREFIX) or "." in name:
        raise ValueError(f"refusing to rebuild {path!r}: not a fedmef_toolkit class")
    return getattr(importlib.import_module(module), name)


def encode_plan(plan, global_masks: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict]:
    """A freshly made ClientPlan (before `begin`) as (arrays, config).

    Generic over plan classes: scalars, strings, None, recipe sections
    (dataclasses) and lists of them go to the config as JSON; tensors and dicts
    of tensors to arrays; a weight penalty (BaE) as its kind, lambda and masks
    (bits). FedMef's growth request is sent as theta_low (see the module
    docstring), and not again where the penalty's masks are theta_low."""
    from ..fl.plan import ClientPlan, MaskedWeightPenalty

    if not isinstance(plan, ClientPlan):
        raise TypeError(f"not a ClientPlan: {type(plan).__name__}")
    arrays: dict[str, np.ndarray] = {}
    fields: dict = {}
    tensor_meta: dict = {}
    attrs = dict(vars(plan))
    request = attrs.pop("request", None) if "request" in attrs else "absent"
    if request != "absent":
        if request is None:
            fields["request"] = None
        else:
            lows = {n: cand.to(global_masks[n].device) & global_masks[n] for n, (_, cand) in request.items()}
            penalty = attrs.get("_penalty")
            if isinstance(penalty, MaskedWeightPenalty) and penalty.active and all(
                    n in penalty.targets and torch.equal(penalty.masks[n].bool(), low_n) for n, low_n in lows.items()):
                fields["request"] = {"from": "penalty", "layers": sorted(request),
                                     "k": {n: k for n, (k, _) in request.items()}}
            else:  # theta_low derived from the candidates: cand & mask
                for n, low_n in lows.items():
                    arrays[f"request.{n}"] = pack_bool(low_n)
                    tensor_meta[f"request.{n}"] = [list(low_n.shape), "bool"]
                fields["request"] = {"from": "arrays", "layers": sorted(request),
                                     "k": {n: k for n, (k, _) in request.items()}}
    for name, value in attrs.items():
        if name == "logs":
            continue
        if isinstance(value, MaskedWeightPenalty):
            if not value.active:  # no targets this round (lam 0): it changes nothing, nothing travels
                fields[name] = {"json": None}
                continue
            keys = {}
            for k in value.targets:  # theta_low's layers; the others' masks are zero
                _put_tensor(arrays, tensor_meta, f"attr.{name}.{k}", value.masks[k].bool())
                keys[k] = f"attr.{name}.{k}"
            fields[name] = {"penalty": {"kind": value.kind, "lam": value.lam_value, "masks": keys}}
        elif isinstance(value, torch.Tensor):
            _put_tensor(arrays, tensor_meta, f"attr.{name}", value)
            fields[name] = {"tensor": f"attr.{name}"}
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            keys = {}
            for k, v in value.items():
                _put_tensor(arrays, tensor_meta, f"attr.{name}.{k}", v)
                keys[k] = f"attr.{name}.{k}"
            fields[name] = {"tensor_dict": keys}
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields[name] = {"dataclass": _class_path(value), "value": dataclasses.asdict(value)}
        else:
            json.dumps(value)  # scalars, strings, None, lists/dicts of them; anything else cannot travel
            fields[name] = {"json": value}
    return arrays, {"plan_class": _class_path(plan), "plan_fields": json.dumps(fields),
                    "plan_tensors": json.dumps(tensor_meta)}


def _put_tensor(arrays, meta, key, t: torch.Tensor) -> None:
    if t.dtype == torch.bool:
        arrays[key] = pack_bool(t)
        meta[key] = [list(t.shape), "bool"]
    else:
        arrays[key] = _np(t)
        meta[key] = [list(t.shape), "dense"]


def _get_tensor(arrays, meta, key, device) -> torch.Tensor:
    shape, kind = meta[key]
    t = unpack_bool(arrays[key], shape) if kind == "bool" else torch.from_numpy(np.array(arrays[key])).view(shape)
    return t.to(device)


def decode_plan(arrays: dict[str, np.ndarray], config: dict, model_masks: dict[str, torch.Tensor], device):
    cls = _load_class(str(config["plan_class"]))
    from ..fl.plan import ClientPlan, MaskedWeightPenalty

    if not (isinstance(cls, type) and issubclass(cls, ClientPlan)):
        raise ValueError(f"{config['plan_class']} is not a ClientPlan")
    fields = json.loads(config["plan_fields"])
    meta = json.loads(config["plan_tensors"])
    plan = cls.__new__(cls)
    plan.logs = {}
    for name, spec in fields.items():
        if name == "request":
            continue
        if "tensor" in spec:
            value = _get_tensor(arrays, meta, spec["tensor"], device)
        elif "tensor_dict" in spec:
            value = {k: _get_tensor(arrays, meta, key, device) for k, key in spec["tensor_dict"].items()}
        elif "penalty" in spec:
            masks = {k: _get_tensor(arrays, meta, key, device) for k, key in spec["penalty"]["masks"].items()}
            # in the worker's layout (its masks'): the step's multi-tensor kernels need one layout
            value = MaskedWeightPenalty(spec["penalty"]["kind"], {k: model_masks[k].to(device) for k in masks})
            value.set_(masks, spec["penalty"]["lam"])
        elif "dataclass" in spec:
            dc = _load_class(spec["dataclass"])
            value = dc(**spec["value"])
        else:
            value = spec["json"]
        setattr(plan, name, value)
    if "request" in fields:
        req = fields["request"]
        if req is None:
            plan.request = None
        else:
            if req["from"] == "penalty":
                lows = {n: plan.penalty().masks[n].bool() for n in req["layers"]}
            else:
                lows = {n: _get_tensor(arrays, meta, f"request.{n}", device) for n in req["layers"]}
            plan.request = {n: (int(req["k"][n]), ~model_masks[n].to(device) | lows[n].to(device))
                            for n in req["layers"]}
    return plan


# -- client results ------------------------------------------------------------

def encode_result(result) -> tuple[dict[str, np.ndarray], dict]:
    arrays, config = encode_state(result.state)
    grow = result.upload.get("grow", {})
    for name, (idx, val) in grow.items():
        arrays[f"grow.{name}.idx"] = _np(idx.to(torch.int32))
        arrays[f"grow.{name}.val"] = _np(val)
    other = {k: v for k, v in result.upload.items() if k != "grow"}
    if other:
        raise ValueError(f"cannot send upload entries {sorted(other)} (only 'grow' travels)")
    config.update({"cid": int(result.cid), "num_samples": int(result.num_samples), "loss": float(result.loss),
                   "steps": int(result.steps), "grow_layers": json.dumps(sorted(grow)),
                   "logs": json.dumps(result.logs)})
    return arrays, config


def decode_result(arrays: dict[str, np.ndarray], config: dict, device=None):
    from ..fl.client import ClientResult

    grow_layers = json.loads(config["grow_layers"])
    state_arrays = {k: v for k, v in arrays.items() if not k.startswith("grow.")}
    state = decode_state(state_arrays, config, device)
    upload = {}
    if grow_layers:
        upload["grow"] = {n: (torch.from_numpy(np.array(arrays[f"grow.{n}.idx"])).to(torch.int64).to(device),
                              torch.from_numpy(np.array(arrays[f"grow.{n}.val"])).to(device))
                          for n in grow_layers}
    return ClientResult(int(config["cid"]), int(config["num_samples"]), state, float(config["loss"]),
                        int(config["steps"]), upload, json.loads(config["logs"]))
