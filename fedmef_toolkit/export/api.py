"""Export a trained model and read it back: `export_model`, `load_sparse`, `load_model`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..architecture import check_fits, parse_description
from ..errors import UserError, brief
from ..sparse.masks import MASK_SUFFIX
from ..storage import HASH_KEY, check_output_file, read_safetensors_verified, save_safetensors
from .io import read_metadata, read_safetensors
from .sparse_format import DTYPES, FORMAT, VERSION, densify, pack_state

FORMATS = ("sparse-safetensors", "safetensors")


def read_source(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, architecture description, provenance) from a run directory,
    a model.safetensors or a checkpoint.safetensors."""
    run_dir = None
    if path.is_dir():
        run_dir = path
        path = path / "model.safetensors" if (path / "model.safetensors").exists() else path / "checkpoint.safetensors"
        if not path.exists():
            raise UserError("no model.safetensors or checkpoint.safetensors in this directory", str(run_dir))
    tensors, meta = read_safetensors(path)
    if meta.get("format") == FORMAT:
        raise UserError("already a sparse export; export from the run directory or a dense model file", str(path))
    if any(k.startswith("model.") for k in tensors):  # a checkpoint: model.* and strategy.* tensors
        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        run_dir = run_dir or path.parent
        model_meta = {}
        mfile = run_dir / "model.safetensors"
        if mfile.exists():
            model_meta = read_metadata(mfile)
        meta = {**model_meta, **meta}
        st = _checkpoint_state(meta, run_dir / "checkpoint.json")
        meta.setdefault("round", str(st.get("round", "")))
        meta.setdefault("recipe_digest", str(st.get("recipe_digest", "")))
    if "fedmef_arch" not in meta:
        raise UserError("no architecture description in the file's metadata (not written by fedmef train/convert)", str(path))
    desc = parse_description(meta["fedmef_arch"], str(path))
    masks = {k: v for k, v in tensors.items() if k.endswith(MASK_SUFFIX)}
    total = sum(m.numel() for m in masks.values())
    provenance = {
        "recipe_digest": meta.get("recipe_digest", ""), "round": meta.get("round", ""),
        "density": round(sum(int(m.sum()) for m in masks.values()) / total, 6) if total else 1.0,
        "val_accuracy": meta.get("val_accuracy", ""), "toolkit_version": __version__, "source": str(path),
    }
    return tensors, desc, provenance


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
    meta = {"format": FORMAT if sparse else "fedmef-dense", "format_version": VERSION,
            "layout": json.dumps(layout), "fedmef_arch": json.dumps(desc), "provenance": json.dumps(prov)}
    if not sparse:
        meta.update({k: str(v) for k, v in prov.items()})
    check_output_file(out)
    save_safetensors(out, tensors, meta)
    dense_bytes = sum(t.numel() * (DTYPES[dtype].itemsize if t.is_floating_point() else t.element_size())
                      for k, t in state.items() if not k.endswith(MASK_SUFFIX))
    return {"tensors": len(layout), "csr": sum(1 for v in layout.values() if v["layout"] == "csr"),
            "density": prov["density"], "bytes": out.stat().st_size, "dense_value_bytes": dense_bytes}


def load_sparse(path: str | Path, as_sparse: bool = False) -> dict[str, torch.Tensor]:
    """State dict of a file we exported: dense tensors (masks restored as `*.weight_mask`),
    or with as_sparse=True torch sparse CSR tensors (shape (out, rest)) for CSR entries."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        return tensors
    return densify(tensors, meta, str(path), as_sparse=as_sparse)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A ready-to-run module in eval mode from an exported (sparse or dense) file."""
    from .io import build_model_for, read_model_file

    state, desc = read_model_file(path)
    if desc is None:
        raise UserError("no architecture description in the file's metadata", str(path))
    return build_model_for(desc, state, str(path)).to(device).eval()


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
