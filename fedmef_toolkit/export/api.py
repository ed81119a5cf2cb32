"""Export a trained model and read it back: `export_model`, `load_sparse`, `load_model`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from .. import rundir as rd
from ..architecture import check_fits, parse_description
from ..errors import UserError, brief
from ..sparse.masks import MASK_SUFFIX
from ..storage import HASH_KEY, check_output_file, read_safetensors_verified, save_safetensors
from .io import read_metadata, read_safetensors
from .sparse_format import DTYPES, FORMAT, VERSION, densify, pack_state

FORMATS = ("sparse-safetensors", "safetensors")


def read_source(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, architecture description, provenance) from a run directory,
    a model.safetensors or a checkpoint.safetensors. A run with only a checkpoint (killed,
    or still training) exports its checkpoint's model."""
    path = Path(path)
    run_dir = None
    if path.is_dir():
        run_dir = path
        path = rd.RunDir(path).model_source()
    tensors, meta = read_safetensors(path)
    if meta.get(rd.FORMAT_KEY) == FORMAT:
        raise UserError("already a sparse export; export from the run directory or a dense model file", str(path))
    if any(k.startswith("model.") for k in tensors):  # a checkpoint: model.* and strategy.* tensors
        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        run = rd.RunDir(run_dir or path.parent)
        model_meta = read_metadata(run.model) if run.model.exists() else {}
        meta = {**model_meta, **meta}
        st = _checkpoint_state(meta, run.checkpoint_state)
        meta.setdefault(rd.ROUND_KEY, str(st.get("round", "")))
        meta.setdefault(rd.RECIPE_DIGEST_KEY, str(st.get("recipe_digest", "")))
        if rd.ARCH_KEY not in meta:  # a checkpoint written before checkpoints carried it
            desc = _description_from_recipe(run)
            if desc is not None:
                meta[rd.ARCH_KEY] = json.dumps(desc)
    if rd.ARCH_KEY not in meta:
        raise UserError("no architecture description in the file's metadata (not written by fedmef train/convert)", str(path))
    desc = parse_description(meta[rd.ARCH_KEY], str(path))
    masks = {k: v for k, v in tensors.items() if k.endswith(MASK_SUFFIX)}
    total = sum(m.numel() for m in masks.values())
    provenance = {
        "recipe_digest": meta.get(rd.RECIPE_DIGEST_KEY, ""), "round": _number(meta.get(rd.ROUND_KEY, ""), int),
        "density": round(sum(int(m.sum()) for m in masks.values()) / total, 6) if total else 1.0,
        "val_accuracy": _number(meta.get(rd.VAL_ACCURACY_KEY, ""), float), "toolkit_version": __version__, "source": str(path),
    }
    return tensors, desc, provenance


def _number(text, kind):
    """A metadata number (stored as text) as a number in provenance JSON; None when absent."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


def _description_from_recipe(run: "rd.RunDir") -> dict | None:
    """The registry description of a run's recipe (no model.init), from its saved recipe and the
    classes in its partition.json; None when it cannot be known without the data set."""
    from ..assembly import KNOWN_SHAPES, recipe_description
    from ..recipe import load_saved_recipe

    if not run.recipe.is_file():
        return None
    try:
        recipe = load_saved_recipe(str(run.recipe))[0]
        classes = len(json.loads(run.partition.read_text())["classes"]) if run.partition.is_file() else None
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None
    if recipe.model.init:
        return None
    d = recipe.data
    size = d.synthetic.image_size if d.dataset == "synthetic" else KNOWN_SHAPES.get(d.dataset, (None, 32))[1]
    classes = classes or (d.synthetic.num_classes if d.dataset == "synthetic" else KNOWN_SHAPES.get(d.dataset, (None,))[0])
    return None if classes is None else recipe_description(recipe.model, classes, size)


def _checkpoint_state(meta: dict, state_file: Path) -> dict:
    """The checkpoint's state (round, recipe digest): from its own metadata, else from the
    checkpoint.json an earlier version wrote beside it; {} when neither is readable."""
    from ..fl.checkpoint import STATE_KEY

    try:
        text = meta[STATE_KEY] if STATE_KEY in meta else state_file.read_text() if state_file.exists() else "{}"
        st = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return {}
    return st if isinstance(st, dict) else {}


def export_model(src: Path, out: Path, fmt: str = "sparse-safetensors", dtype: str = "fp32") -> dict:
    """Write `out`; returns a summary (tensors, density, bytes, dense bytes)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
    state, desc, prov = read_source(src)
    sparse = fmt == "sparse-safetensors"
    tensors, layout = pack_state(state, DTYPES[dtype], sparse=sparse)
    meta = {rd.FORMAT_KEY: FORMAT if sparse else rd.DENSE_FORMAT, "format_version": VERSION,
            rd.LAYOUT_KEY: json.dumps(layout), rd.ARCH_KEY: json.dumps(desc), rd.PROVENANCE_KEY: json.dumps(prov)}
    if not sparse:
        meta.update({k: "" if v is None else str(v) for k, v in prov.items()})
    check_output_file(out)
    save_safetensors(out, tensors, meta)
    dense_bytes = sum(t.numel() * (DTYPES[dtype].itemsize if t.is_floating_point() else t.element_size())
                      for k, t in state.items() if not k.endswith(MASK_SUFFIX))
    size = out.stat().st_size
    summary = {"tensors": len(layout), "csr": sum(1 for v in layout.values() if v["layout"] == "csr"),
               "density": prov["density"], "bytes": size, "dense_value_bytes": dense_bytes, "warning": None}
    if sparse and size > dense_bytes:
        summary["warning"] = (f"the sparse file ({size / 2**20:.2f} MiB) is larger than the dense values "
                              f"({dense_bytes / 2**20:.2f} MiB): the model is {'dense' if prov['density'] >= 1 else 'too dense'} "
                              f"(density {prov['density']:.3f}); --format safetensors is smaller")
    return summary


def load_sparse(path: str | Path, as_sparse: bool = False) -> dict[str, torch.Tensor]:
    """State dict of a file we exported: dense tensors (masks restored as `*.weight_mask`),
    or with as_sparse=True torch sparse CSR tensors (shape (out, rest)) for CSR entries."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        return tensors
    return densify(tensors, meta, str(path), as_sparse=as_sparse)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A ready-to-run module in eval mode from an exported (sparse or dense) file, a run's
    model.safetensors or a file from `fedmef convert` (`fedmef_toolkit.architecture`)."""
    from ..architecture import load_model_file

    model, _ = load_model_file(path)
    return model.to(device).eval()


def inspect_file(path: str | Path) -> dict:
    """Per-tensor layout, shape, density and bytes, plus the metadata. A file is fully
    validated first (content hash, sparse layout, architecture description against its
    tensors), so a damaged one is reported rather than listed. `hash` says
    whether the content hash was checked ("verified") or the file has none ("absent":
    written before hashes existed; such files are accepted)."""
    tensors, meta, verified = read_safetensors_verified(Path(path))
    rows = []
    state = densify(tensors, meta, str(path)) if meta.get("format") == FORMAT else tensors
    if "fedmef_arch" in meta:  # the description must rebuild a model these tensors fit
        check_fits(parse_description(meta["fedmef_arch"], str(path)),
                   {k: tuple(v.shape) for k, v in state.items()}, str(path))
    if meta.get("format") == FORMAT:
        layout = json.loads(meta["layout"])
        for name, info in layout.items():
            parts = [f"{name}.{p}" for p in ("values", "col_indices", "crow_indices")] if info["layout"] == "csr" else [name]
            nbytes = sum(tensors[p].numel() * tensors[p].element_size() for p in parts if p in tensors)
            numel = 1
            for d in info["shape"]:
                numel *= d
            nnz = tensors[parts[0]].numel() if info["layout"] == "csr" and parts[0] in tensors else numel
            rows.append({"name": name, "layout": info["layout"], "shape": info["shape"], "dtype": info["dtype"],
                         "stored_dtype": str(tensors[parts[0]].dtype).replace("torch.", "") if parts[0] in tensors else "?",
                         "density": nnz / max(1, numel), "bytes": nbytes})
    else:
        for name, t in tensors.items():
            rows.append({"name": name, "layout": "dense", "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                         "stored_dtype": str(t.dtype).replace("torch.", ""),
                         "density": int(torch.count_nonzero(t)) / t.numel() if t.numel() else 1.0,
                         "bytes": t.numel() * t.element_size()})
    return {"file": str(path), "bytes": Path(path).stat().st_size, "hash": "verified" if verified else "absent",
            "metadata": {k: v for k, v in meta.items() if k != HASH_KEY}, "tensors": rows}
