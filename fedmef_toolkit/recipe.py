"""Recipes: the typed, validated description of a whole experiment.

A recipe is a YAML mapping whose sections mirror the dataclasses below. Every
field has a default, so a recipe only states what differs. `load_recipe`
reads a file (or a bundled recipe by name), applies `--set key.path=value`
overrides and validates everything, raising `UserError` with a one-line
message that names the file and the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, brief
from .fields import spec_field as _f
from .fl.strategies.fedmef import BaESpec  # noqa: F401  (importable from here, as before)
from .fl.strategies.registry import METHODS
from .storage import check_path_text


@dataclass
class SyntheticSpec:
    num_samples: int = _f(4000, lo=20, hi=10_000_000, help="training + validation images generated")
    num_classes: int = _f(10, lo=2, hi=1000)
    image_size: int = _f(16, lo=8, hi=256)
    noise: float = _f(0.35, lo=0.0, hi=5.0, help="pixel noise relative to the class pattern")


@dataclass
class DataSpec:
    dataset: str = _f("synthetic", choices=["synthetic", "cifar10", "cinic10", "imagefolder", "tinyimagenet"])
    root: str | None = _f(None, help="data set directory or archive (.tar, .tar.gz, .tar.xz, .zip)")
    download: bool = _f(False, help="cifar10 only: download into root if missing")
    cache_dir: str | None = _f(None, help="decoded uint8 cache (default ~/.cache/fedmef)")
    partition: str = _f("dirichlet", choices=["iid", "dirichlet"])
    alpha: float = _f(0.5, lo=0.0, lo_open=True, hi=1e6, help="Dirichlet concentration")
    num_clients: int = _f(100, lo=1, hi=1_000_000)
    min_samples: int = _f(10, lo=1, hi=1_000_000, help="minimum training samples per client")
    val_split: float = _f(0.1, lo=0.0, hi=0.9, help="fraction of training data held out for validation when no test split is used")
    augment: bool = _f(True, help="random crop (pad 4) + horizontal flip on the device")
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)


@dataclass
class NSConvSpec:
    stats: str = _f("active", choices=["active", "all"], help="standardise over active entries or all entries then mask")
    unbiased: bool = _f(False)
    eps: float = _f(1e-4, lo=0.0, lo_open=True, hi=1.0)
    alpha: float = _f(0.2, lo=0.0, lo_open=True, hi=1.0,
                      help="residual branch scale of the BN-free blocks: h + alpha * f(h / beta)")
    calibrate: bool = _f(False, help="data-dependent gain init: one client rescales each NSConv gain to unit output "
                                     "variance on its first 256 images and sends the gains (not with model.init)")
    center_depthwise: bool = _f(False, help="centre depthwise filters too (plain NSConv); false: unit-norm depthwise "
                                            "filters on a mean-shifted input, which keep low spatial frequencies")
    center_head: bool = _f(False, help="the classifier sees its input minus the scaled ReLU's expected mean, "
                                       "which lets BN-free models take the larger learning rates BN models use")


@dataclass
class ModelSpec:
    arch: str = _f("resnet18", choices=["resnet18", "resnet_narrow", "mobilenetv2", "cnn4"],
                   help="resnet_narrow: the FedMef authors' 16/32/64 CIFAR ResNet")
    norm: str = _f("bn", choices=["bn", "nsconv"])
    width: float = _f(1.0, lo=0.0, lo_open=True, hi=8.0, help="channel width multiplier")
    init: str | None = _f(None, help="initial weights: a safetensors file (e.g. from `fedmef convert`)")
    nsconv: NSConvSpec = field(default_factory=NSConvSpec)


@dataclass
class FlowerSpec:
    min_results: int = _f(1, lo=1, hi=1_000_000,
                          help="fl.engine flower: fewest client results a round aggregates (failed clients are "
                               "logged and skipped; fewer results stop the run at the last checkpoint)")
    timeout_s: float = _f(0.0, lo=0.0, hi=1e7, help="fl.engine flower: seconds a round waits for replies (0: no limit)")
    supernodes: int = _f(0, lo=0, hi=1_000_000,
                         help="fl.engine flower simulation: virtual SuperNodes (0: data.num_clients, one per client)")
    client_cpus: float = _f(1.0, lo=0.0, lo_open=True, hi=1024.0, help="fl.engine flower simulation: CPUs per ClientApp")
    client_gpus: float = _f(0.0, lo=0.0, hi=64.0,
                            help="fl.engine flower simulation: GPUs per ClientApp (e.g. 1.0: one client per GPU)")


@dataclass
class FLSpec:
    rounds: int = _f(500, lo=1, hi=1_000_000)
    clients_per_round: int = _f(10, lo=1, hi=1_000_000)
    local_epochs: int = _f(5, lo=1, hi=10_000)
    batch_size: int = _f(64, lo=1, hi=65_536)
    optimizer: str = _f("sgd", choices=["sgd"])
    lr: float = _f(0.01, lo=0.0, lo_open=True, hi=100.0)
    lr_schedule: str = _f("constant", choices=["constant", "cosine", "exp"], help="over rounds")
    lr_decay: float = _f(0.998, lo=0.0, lo_open=True, hi=1.0, help="per-round factor for lr_schedule: exp")
    momentum: float = _f(0.0, lo=0.0, hi=0.999)
    weight_decay: float = _f(5e-4, lo=0.0, hi=1.0, help="on conv and linear weights only (not on biases, gains, norms)")
    agc: float = _f(0.0, lo=0.0, hi=10.0,
                    help="adaptive gradient clipping: each unit's gradient norm <= agc * its weight norm (0: off)")
    engine: str = _f("auto", choices=["auto", "sequential", "batched", "flower"],
                     help="client training: one after another, or a round's clients together on one GPU, each on "
                          "its own CUDA stream (batched); auto picks the one measured faster (sequential for now); flower: "
                          "through Flower's simulation engine (pip install 'fedmef-toolkit[flower]')")
    batched_clients: int = _f(0, lo=0, hi=1_000_000,
                              help="batched engine: most clients trained at once (0: as many as fit in memory)")
    flower: FlowerSpec = field(default_factory=FlowerSpec)


@dataclass
class SparsitySpec:
    density: float = _f(0.1, lo=0.0, lo_open=True, hi=1.0)
    distribution: str = _f("erk", choices=["erk", "uniform"])
    init: str = _f("random", choices=["random", "magnitude"])
    delta_t: int = _f(10, lo=1, hi=1_000_000, help="rounds between mask adjustments")
    t_end: int = _f(300, lo=1, hi=1_000_000, help="last round with a mask adjustment")
    alpha: float = _f(0.2, lo=0.0, hi=1.0, help="initial adjustment fraction (cosine-annealed)")
    grow_grad: str = _f("batch", choices=["batch", "full"], help="client gradient for growth: one batch or all local data")


@dataclass
class SAPSpec:
    enabled: bool = _f(False)
    gamma: float = _f(0.5, lo=0.0, hi=0.999, help="fraction of each layer input dropped from what backward keeps")
    selection: str = _f("per_sample", choices=["per_sample", "per_tensor"])


def _method_spec():
    """`method`: the method's name (choices from the registry), the shared sparsity and SAP
    sections, and each registered method's own section (`method.<section>`)."""
    fields = [("name", str, _f("fedavg", choices=list(METHODS), help="federated method (fedmef recipes --reference "
                                                                       "lists them)")),
              ("sparsity", SparsitySpec, field(default_factory=SparsitySpec))]
    fields += [(i.section, i.spec, field(default_factory=i.spec)) for i in METHODS.values() if i.spec is not None]
    fields.insert(3, ("sap", SAPSpec, field(default_factory=SAPSpec)))  # after bae, where it always was
    cls = dataclasses.make_dataclass("MethodSpec", fields)
    cls.__module__ = __name__
    return cls


MethodSpec = _method_spec()


@dataclass
class EvalSpec:
    every: int = _f(1, lo=1, hi=1_000_000, help="evaluate the global model every n rounds (and at the last)")
    batch_size: int = _f(512, lo=1, hi=65_536, help="images per forward pass (on the CPU at most 128: memory)")
    split: str = _f("val", choices=["val", "test"], help="held-out part of the training data, or the data set's test split")


@dataclass
class OutputSpec:
    dir: str = _f("runs")
    name: str | None = _f(None, help="run directory name (default: recipe name + time)")
    checkpoint_every: int = _f(10, lo=1, hi=1_000_000)
    memory_report: bool = _f(True, help="write memory.json at the start of training")


@dataclass
class Recipe:
    name: str = _f("experiment")
    seed: int = _f(0, lo=0, hi=2**32 - 1)
    device: str = _f("auto", help="auto, cpu, cuda or cuda:N")
    precision: str = _f("fp32", choices=["fp32", "bf16"], help="bf16 autocast (CUDA only)")
    cuda_graphs: bool = _f(True, help="replay client steps from CUDA graphs (CUDA only; eager where it cannot)")
    channels_last: bool | None = _f(None, help="client models and batches in channels-last memory format "
                                    "(null: on CUDA, off on the CPU)")
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    fl: FLSpec = field(default_factory=FLSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self, without: tuple[str, ...] = ()) -> str:
        """Content hash of the settings that shape the run (resume refuses another recipe's checkpoint).
        Other methods' own sections are left out, so a setting of one method never invalidates a
        run of another; `method.bae` stays in every digest, as before the registry existed.
        `without`: dotted keys left out too (keys a run saved by an older version lacks)."""
        data = self.to_dict()
        for key in without:
            *sections, last = key.split(".")
            node = data
            for part in sections:
                node = node.get(part, {})
            node.pop(last, None)
        for info in METHODS.values():
            if info.section and info.name != self.method.name and info.section not in _ALWAYS_HASHED:
                data["method"].pop(info.section, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_ALWAYS_HASHED = {"bae"}  # sections hashed for every method (digests of runs from before the registry)


# --------------------------------------------------------------------------
# Building a recipe from plain data, with validation


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str, src: str, nullable: bool = False):
    """Check `value` against the field type `tp`; ints pass as floats. `nullable`: the field also
    takes null (said in the message when the value is of neither type)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, src, nullable=type(None) in args)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number or isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):  # YAML 1.1: 5e-5 is a string
            try:
                return float(value)
            except OverflowError:  # an integer beyond the float range
                raise UserError(f"{where}: must be a finite number, got an integer too large for a float", src) from None
    elif tp is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise UserError(f"{where}: contains a NUL byte", src)
            return value
    expected = f"{_type_name(tp)} or null" if nullable else _type_name(tp)
    raise UserError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}", src)


def _check_range(value, meta, where, src):
    if value is None:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        hint = difflib.get_close_matches(str(value), meta["choices"], n=1)
        more = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"{where}: '{value}' is not one of {', '.join(meta['choices'])}{more}", src)
    lo, hi = meta["lo"], meta["hi"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: must be a finite number, got {value}", src)
        if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
            op = ">" if meta["lo_open"] else ">="
            raise UserError(f"{where}: must be {op} {lo}, got {value}", src)
        if hi is not None and value > hi:
            raise UserError(f"{where}: must be <= {hi}, got {value}", src)


def _build(cls, data: Any, prefix: str, src: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'recipe'}: expected a mapping, got {type(data).__name__}", src)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            more = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise UserError(f"unknown key '{where}'{more}", src)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.", src)
        else:
            value = _coerce(value, tp, where, src)
            _check_range(value, fields[key].metadata, where, src)
            kwargs[key] = value
    return cls(**kwargs)


def _check_consistency(r: Recipe, src: str, need_data: bool = True) -> None:
    """Settings that are valid alone but not together."""
    if r.fl.clients_per_round > r.data.num_clients:
        raise UserError(
            f"fl.clients_per_round ({r.fl.clients_per_round}) exceeds data.num_clients ({r.data.num_clients})", src
        )
    if r.data.dataset != "synthetic" and not r.data.root:
        raise UserError(f"data.root is required for data.dataset '{r.data.dataset}'", src)
    if r.data.dataset == "synthetic" and r.eval.split == "test":
        raise UserError("eval.split: the synthetic data set has no test split; use 'val'", src)
    if r.eval.split == "val" and r.data.val_split == 0.0:
        raise UserError("eval.split is 'val' but data.val_split is 0: nothing would be held out", src)
    if r.precision == "bf16" and r.device == "cpu":
        raise UserError("precision: bf16 autocast is for CUDA; use fp32 on the CPU", src)
    if not (r.device in ("auto", "cpu", "cuda") or (r.device.startswith("cuda:") and r.device[5:].isdigit())):
        raise UserError(f"device: '{r.device}' is not auto, cpu, cuda or cuda:N", src)
    sp = r.method.sparsity
    if METHODS[r.method.name].dynamic and sp.t_end < sp.delta_t:
        raise UserError(
            f"method.sparsity.t_end ({sp.t_end}) < delta_t ({sp.delta_t}): no mask adjustment would ever run", src
        )
    for where, text, name_only in (("output.dir", r.output.dir, False), ("output.name", r.output.name, True),
                                   ("name", r.name, True), ("data.root", r.data.root, False),
                                   ("data.cache_dir", r.data.cache_dir, False), ("model.init", r.model.init, False)):
        problem = check_path_text(text, where, name_only) if text is not None else None
        if problem:
            raise UserError(problem, src)
    s = r.data.synthetic
    if r.data.dataset == "synthetic" and s.num_samples * 3 * s.image_size**2 > MAX_SYNTHETIC_BYTES:
        raise UserError(f"data.synthetic: {s.num_samples} images of {s.image_size}x{s.image_size} take "
                        f"{s.num_samples * 3 * s.image_size**2:,} bytes, more than {MAX_SYNTHETIC_BYTES:,}", src)
    if r.model.init and not Path(r.model.init).expanduser().exists():
        raise UserError(f"model.init: file not found: {r.model.init}", src)
    if need_data and r.data.root and not r.data.download and not Path(r.data.root).expanduser().exists():
        raise UserError(f"data.root: not found: {r.data.root}", src)


MAX_SYNTHETIC_BYTES = 1 << 30  # uint8 images (4x that as floats while they are generated)


def recipe_from_dict(data: dict, src: str = "<recipe>", need_data: bool = True) -> Recipe:
    """need_data=False: data.root need not exist (`fedmef report` only needs shapes)."""
    recipe = _build(Recipe, data, "", src)
    _check_consistency(recipe, src, need_data)
    return recipe


MAX_RECIPE_BYTES = 1 << 20


def _at_line(mark) -> str:
    return f" at line {mark.line + 1}" if mark is not None else ""


class _RecipeYAMLError(Exception):
    def __init__(self, message: str, mark=None):
        super().__init__(message + _at_line(mark))


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML without aliases (no expansion bombs; recipes have no use for them) and with
    duplicate keys refused (the second would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _RecipeYAMLError("YAML aliases (*name) are not supported in recipes", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are refused later as unknown keys
            if key in seen:
                raise _RecipeYAMLError(f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, src: str):
    """Parse recipe YAML safely: size limit, no aliases, no duplicate keys, bounded nesting;
    every failure is a UserError naming `src`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise UserError(f"recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB", src)
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except _RecipeYAMLError as exc:
        raise UserError(str(exc), src) from None
    except RecursionError:
        raise UserError("recipe is nested too deeply", src) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise UserError(f"malformed YAML: {brief(exc, 120)}", src) from None
    except yaml.YAMLError as exc:
        where = _at_line(getattr(exc, "problem_mark", None))
        raise UserError(f"malformed YAML{where}: {getattr(exc, 'problem', None) or 'cannot parse'}", src) from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw, f"--set {key}") if raw.strip() else None
    except UserError:
        value = raw  # not YAML: the plain string, checked against the key's type later
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def bundled_recipe_names() -> list[str]:
    files = importlib.resources.files("fedmef_toolkit.recipes")
    return sorted(p.name for p in files.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe_path(name: str) -> tuple[str, str]:
    """Return (source label, YAML text) for a path or a bundled recipe name."""
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return str(path), path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read recipe: {exc}", str(path)) from None
    if path.exists():
        raise UserError("not a regular file (a recipe is a YAML file)", str(path))
    bundled = importlib.resources.files("fedmef_toolkit.recipes")
    fname = name if name.endswith(".yaml") else name + ".yaml"
    candidate = bundled / Path(fname).name
    if candidate.is_file():
        return f"{Path(fname).name} (bundled)", candidate.read_text()
    names = bundled_recipe_names()
    hint = difflib.get_close_matches(Path(fname).name, names, n=1)
    more = f"; did you mean '{hint[0]}'?" if hint else f"; bundled recipes: {', '.join(names)}"
    raise UserError(f"no such recipe file or bundled recipe{more}", name)


def _read_mapping(name: str) -> tuple[str, dict]:
    src, text = resolve_recipe_path(name)
    data = parse_yaml(text, src)
    if data is None:
        raise UserError("the recipe is empty (a recipe states at least what it trains, e.g. method.name)", src)
    if not isinstance(data, dict):
        raise UserError("a recipe must be a YAML mapping", src)
    return src, data


def load_recipe(name: str, overrides: list[str] | None = None, need_data: bool = True) -> Recipe:
    src, data = _read_mapping(name)
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, src, need_data)


#: keys added after runs were first saved, with the value that reproduces what such a run did
#: (its model, its engine); a saved recipe.yaml always holds every key of its own version
SAVED_RUN_DEFAULTS = {"model.nsconv.center_depthwise": True, "model.nsconv.center_head": False,
                      "fl.batched_clients": 0, "fl.flower": {}, "channels_last": False}


def load_saved_recipe(path: str, overrides: list[str] | None = None,
                      need_data: bool = True) -> tuple[Recipe, tuple[str, ...]]:
    """A run directory's recipe.yaml, and the keys it lacks because an older version wrote it:
    those take the values of `SAVED_RUN_DEFAULTS` (so the run resumes as it trained, not with
    today's defaults) and are left out of its digest (`Recipe.digest(without=...)`)."""
    src, data = _read_mapping(path)
    missing = []
    for key, value in SAVED_RUN_DEFAULTS.items():
        *sections, last = key.split(".")
        node = data
        for part in sections:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if isinstance(node, dict) and last not in node:
            node[last] = copy.deepcopy(value)
            missing.append(key)
    return recipe_from_dict(apply_overrides(data, overrides or []), src, need_data), tuple(missing)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def describe_fields(cls=Recipe, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help + range) rows for the recipe reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
            continue
        m = f.metadata
        extra = []
        if m.get("choices"):
            extra.append("one of " + ", ".join(m["choices"]))
        if m.get("lo") is not None:
            extra.append((">" if m.get("lo_open") else ">=") + f" {m['lo']}")
        if m.get("hi") is not None:
            extra.append(f"<= {m['hi']}")
        text = "; ".join(x for x in [m.get("help", "")] + extra if x)
        rows.append((prefix + f.name, str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__, f.default, text))
    return rows
