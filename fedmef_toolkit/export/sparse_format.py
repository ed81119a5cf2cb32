"""The fedmef-sparse safetensors format, version 1 (documented in docs/sparse-format.md).

A masked weight of shape (out, ...) is stored as a CSR matrix of shape
(out, prod(...)) built from its mask: `<name>.values`, `<name>.col_indices`,
`<name>.crow_indices`, with the smallest integer dtypes that hold the
indices. The mask is implied by the CSR pattern. Tensors without a mask, or
whose CSR form would be larger than the dense one, are stored as they are
(with their mask tensor, if any). The `__metadata__` header holds:

  format          "fedmef-sparse"
  format_version  "1"
  layout          JSON {name: {"layout": "csr"|"dense", "shape": [...], "dtype": "float32", ...}}
  fedmef_arch     JSON architecture description (rebuilds the model)
  provenance      JSON {recipe_digest, round, density, val_accuracy, toolkit_version, ...}

Reading validates everything against the header before building a tensor,
so a damaged or hostile file is refused with a one-line error, and never
allocates more than MAX_EXPANSION times the file's stored bytes (plus
EXPANSION_FLOOR): a tiny file cannot declare gigabytes of zeros.
"""

from __future__ import annotations

import json
import math

import torch

from ..errors import UserError, brief
from ..sparse.masks import MASK_SUFFIX

FORMAT = "fedmef-sparse"
VERSION = "1"
CSR_PARTS = ("values", "col_indices", "crow_indices")
MAX_EXPANSION = 1024  # decoding allocates at most this many times the stored bytes...
EXPANSION_FLOOR = 64 << 20  # ...plus this
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
                torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def smallest_int_dtype(max_value: int) -> torch.dtype:
    for dt in (torch.int16, torch.int32, torch.int64):
        if max_value <= torch.iinfo(dt).max:
            return dt
    raise ValueError(f"index {max_value} too large")


def csr_from_mask(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = weight.shape[0]
    w2, m2 = weight.reshape(rows, -1), mask.reshape(rows, -1).bool()
    cols = w2.shape[1]
    idx = m2.nonzero()  # row-major: rows ascending, columns ascending within a row
    counts = m2.sum(dim=1)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    nnz = int(crow[-1])
    col = idx[:, 1].to(smallest_int_dtype(max(cols - 1, 0)))
    return w2[m2], col, crow.to(smallest_int_dtype(nnz))


def csr_bytes(nnz: int, rows: int, cols: int, value_bytes: int) -> int:
    col_b = torch.empty((), dtype=smallest_int_dtype(max(cols - 1, 0))).element_size()
    crow_b = torch.empty((), dtype=smallest_int_dtype(nnz)).element_size()
    return nnz * (value_bytes + col_b) + (rows + 1) * crow_b


def pack_state(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, sparse: bool = True):
    """Split a model state (with `*.weight_mask` buffers) into stored tensors and a layout."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    masks = {k[: -len(MASK_SUFFIX)] + "weight": v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    for name, t in state.items():
        if name.endswith(MASK_SUFFIX) and name[: -len(MASK_SUFFIX)] + "weight" in state:
            continue  # written with (or implied by) its weight below
        t = t.detach().cpu()
        info = {"shape": list(t.shape), "dtype": _DTYPE_NAMES[t.dtype]}
        stored = t.to(dtype) if t.is_floating_point() else t
        mask = masks.get(name)
        if sparse and mask is not None and t.dim() >= 2:
            rows, cols = t.shape[0], math.prod(t.shape[1:])
            nnz = int(mask.sum())
            if csr_bytes(nnz, rows, cols, stored.element_size()) < stored.numel() * stored.element_size():
                values, col, crow = csr_from_mask(stored, mask.cpu())
                tensors[f"{name}.values"], tensors[f"{name}.col_indices"], tensors[f"{name}.crow_indices"] = values, col, crow
                layout[name] = {**info, "layout": "csr", "mask": True}
                continue
        tensors[name] = stored.contiguous()
        layout[name] = {**info, "layout": "dense"}
        if mask is not None:
            tensors[name[: -len("weight")] + MASK_SUFFIX] = mask.cpu().bool().contiguous()
            layout[name]["mask"] = True
    for name, t in tensors.items():  # masks of dense-stored weights, and any other mask buffer
        if name.endswith(MASK_SUFFIX) and name not in layout:
            layout[name] = {"shape": list(t.shape), "dtype": "bool", "layout": "dense"}
    return tensors, layout


def _bad(source: str, what: str):
    raise UserError(f"invalid sparse file: {what}", source)


def _check_csr(name: str, shape: list[int], values, col, crow, source: str) -> None:
    rows = shape[0]
    cols = math.prod(shape[1:])
    if values.dim() != 1 or col.dim() != 1 or crow.dim() != 1:
        _bad(source, f"{name}: CSR parts must be 1-D")
    if not values.is_floating_point():
        _bad(source, f"{name}: values must be floating point, got {values.dtype}")
    for part, t in (("col_indices", col), ("crow_indices", crow)):
        if t.dtype not in (torch.int16, torch.int32, torch.int64):
            _bad(source, f"{name}.{part}: integer dtype expected, got {t.dtype}")
    if crow.numel() != rows + 1:
        _bad(source, f"{name}: crow_indices has {crow.numel()} entries, shape needs {rows + 1}")
    crow64, col64 = crow.to(torch.int64), col.to(torch.int64)
    nnz = values.numel()
    if int(crow64[0]) != 0 or int(crow64[-1]) != nnz or col.numel() != nnz:
        _bad(source, f"{name}: crow_indices must run from 0 to nnz={nnz} and match {col.numel()} column indices")
    if nnz and bool((crow64[1:] < crow64[:-1]).any()):
        _bad(source, f"{name}: crow_indices are not monotonic")
    if nnz and (int(col64.min()) < 0 or int(col64.max()) >= cols):
        _bad(source, f"{name}: column index out of range [0, {cols})")
    if nnz > 1:
        row_of = torch.repeat_interleave(torch.arange(rows), crow64[1:] - crow64[:-1])
        same_row = row_of[1:] == row_of[:-1]
        if bool((same_row & (col64[1:] <= col64[:-1])).any()):
            _bad(source, f"{name}: column indices within a row are not strictly increasing")


def parse_header(meta: dict, source: str) -> dict:
    if meta.get("format") != FORMAT:
        _bad(source, f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != VERSION:
        raise UserError(f"unsupported {FORMAT} format version {meta.get('format_version')!r} "
                        f"(this toolkit reads version {VERSION}); upgrade fedmef-toolkit", source)
    try:
        layout = json.loads(meta["layout"])
    except (KeyError, ValueError, TypeError, RecursionError):
        _bad(source, "missing or corrupt 'layout' metadata")
    if not isinstance(layout, dict):
        _bad(source, "'layout' metadata is not a mapping")
    for name, info in layout.items():
        if (not isinstance(info, dict) or info.get("layout") not in ("csr", "dense")
                or not isinstance(info.get("shape"), list)
                or not all(isinstance(d, int) and 0 <= d < 2**31 for d in info["shape"])
                or info.get("dtype") not in _NAME_DTYPES):
            _bad(source, f"layout entry for {name!r} is malformed")
        if info["layout"] == "csr" and len(info["shape"]) < 2:
            _bad(source, f"{name}: a CSR tensor needs at least 2 dimensions")
        if len(info["shape"]) > 8:
            _bad(source, f"{name}: more than 8 dimensions")
    return layout


def expansion_limit(stored_bytes: int) -> int:
    """Bytes that decoding a file whose tensors take `stored_bytes` may allocate."""
    return MAX_EXPANSION * stored_bytes + EXPANSION_FLOOR


def check_expansion(layout: dict, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, before allocating, a layout that declares more than the file can hold: the
    dense tensors (values and masks) of the CSR entries may take at most MAX_EXPANSION times
    the stored bytes, plus EXPANSION_FLOOR (a real export at 0.1% density expands ~700x)."""
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    need = sum(math.prod(info["shape"]) * (_NAME_DTYPES[info["dtype"]].itemsize + 1)
               for info in layout.values() if info["layout"] == "csr")
    if need > expansion_limit(stored):
        _bad(source, f"the layout declares {need:,} bytes of dense tensors, more than a file of "
                     f"{stored:,} stored bytes can hold (limit {expansion_limit(stored):,})")


def decode(tensors: dict[str, torch.Tensor], meta: dict, source: str, as_sparse: bool = False) -> dict:
    """Validated state dict: dense tensors (masks restored), or torch sparse CSR for CSR entries."""
    layout = parse_header(meta, source)
    check_expansion(layout, tensors, source)
    out: dict[str, torch.Tensor] = {}
    expected = set()
    for name, info in layout.items():
        shape, dtype = info["shape"], _NAME_DTYPES[info["dtype"]]
        if info["layout"] == "dense":
            expected.add(name)
            t = tensors.get(name)
            if t is None:
                _bad(source, f"tensor {name!r} listed in the layout is missing")
            if list(t.shape) != shape:
                _bad(source, f"{name}: stored shape {list(t.shape)} differs from the layout's {shape}")
            out[name] = t.to(dtype) if t.is_floating_point() and dtype.is_floating_point else t
            continue
        parts = [f"{name}.{p}" for p in CSR_PARTS]
        expected.update(parts)
        if any(p not in tensors for p in parts):
            _bad(source, f"{name}: CSR parts missing")
        values, col, crow = (tensors[p] for p in parts)
        _check_csr(name, shape, values, col, crow, source)
        rows, cols = shape[0], math.prod(shape[1:])
        if as_sparse:
            out[name] = torch.sparse_csr_tensor(crow.to(torch.int64), col.to(torch.int64), values.to(dtype),
                                                size=(rows, cols))
            continue
        counts = crow.to(torch.int64)[1:] - crow.to(torch.int64)[:-1]
        row_idx = torch.repeat_interleave(torch.arange(rows), counts)
        flat = row_idx * cols + col.to(torch.int64)
        dense = torch.zeros(rows * cols, dtype=dtype)
        dense[flat] = values.to(dtype)
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[flat] = True
        out[name] = dense.view(shape)
        mask_name = name[: -len("weight")] + MASK_SUFFIX if name.endswith("weight") else name + "_mask"
        out[mask_name] = mask.view(shape)
    extra = set(tensors) - expected
    if extra:
        _bad(source, f"tensors not described by the layout: {sorted(extra)[:3]}")
    return out


def densify(tensors: dict[str, torch.Tensor], meta: dict, source: str, as_sparse: bool = False) -> dict:
    """decode(), with anything a hostile file could still provoke turned into a UserError."""
    try:
        return decode(tensors, meta, source, as_sparse)
    except UserError:
        raise
    except Exception as exc:  # anything a hostile file could still provoke
        raise UserError(f"invalid sparse file: {brief(exc)}", source) from None
