import json
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_recipe
from safetensors.torch import save_file

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.export.api import export_model, load_model, load_sparse
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.recipe import recipe_from_dict

DOCS = Path(__file__).resolve().parents[1] / "docs" / "sparse-format.md"


def trained_run(tmp_path, arch="cnn4", norm="nsconv", method="fedmef", rounds=2):
    rec = small_recipe(tmp_path, **{"model.arch": arch, "model.norm": norm, "method.name": method,
                                    "fl.rounds": rounds, "method.sparsity.density": 0.2,
                                    "method.sparsity.delta_t": 1, "method.sparsity.t_end": 4})
    sim = Simulator(recipe_from_dict(rec), tmp_path / "runs" / "run", show_progress=False)
    sim.write_run_files()
    sim.run()
    return sim


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("norm", ["bn", "nsconv"])
def test_round_trip_is_bitwise(tmp_path, arch, norm):
    sim = trained_run(tmp_path, arch, norm, "fedmef" if norm == "nsconv" else "feddst", rounds=1)
    out = tmp_path / "m.safetensors"
    summary = export_model(sim.run_dir, out)
    assert summary["csr"] > 0
    loaded = load_model(out)
    sim.model.eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), sim.model(x))
    state = load_sparse(out)
    for k, v in sim.model.state_dict().items():
        assert torch.equal(state[k], v.cpu()), k


def test_checkpoint_source_and_dtypes(tmp_path):
    sim = trained_run(tmp_path)
    for dtype, tol in (("fp16", 1e-2), ("bf16", 5e-2)):
        out = tmp_path / f"m_{dtype}.safetensors"
        export_model(sim.run_dir / "checkpoint.safetensors", out, dtype=dtype)
        meta = json.loads(load_file_meta(out)["provenance"])
        assert meta["round"] == 2 and abs(meta["density"] - 0.2) < 0.01
        a = load_model(out)
        x = torch.randn(2, 3, 12, 12)
        sim.model.eval()
        with torch.no_grad():
            ref = sim.model(x)
            assert (a(x) - ref).abs().max() <= tol * ref.abs().max() + tol


def load_file_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_resnet18_size_at_density_0_1(tmp_path):
    from fedmef_toolkit.export.sparse_format import pack_state
    from fedmef_toolkit.models import get_model
    from fedmef_toolkit.sparse.masks import attach_masks, init_masks

    model = get_model("resnet18", 10, norm="nsconv")
    attach_masks(model, init_masks(model, 0.1, "erk", "random", seed=0))
    state = model.state_dict()
    tensors, _ = pack_state(state)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    dense = {k: v for k, v in state.items() if not k.endswith("weight_mask")}
    save_file(dense, str(tmp_path / "d.safetensors"))
    ratio = (tmp_path / "s.safetensors").stat().st_size / (tmp_path / "d.safetensors").stat().st_size
    assert ratio <= 0.16, ratio
    assert tensors["layer4.1.conv2.weight.col_indices"].dtype == torch.int16


def test_scipy_snippet_from_docs(tmp_path):
    """The documented numpy + scipy reader works for every value dtype (issue 12: fp16 failed in
    scipy, bf16 in numpy)."""
    sim = trained_run(tmp_path)
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    for dtype in ("fp32", "fp16", "bf16"):
        out = tmp_path / f"m_{dtype}.safetensors"
        export_model(sim.run_dir, out, dtype=dtype)
        scope = {"path": str(out)}
        exec(compile(code, str(DOCS), "exec"), scope)
        name = scope["name"]
        expected = sim.model.state_dict()[name].cpu()
        if dtype != "fp32":
            expected = expected.to({"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]).float()
        assert scope["weight"].dtype == np.float32
        assert torch.equal(torch.from_numpy(scope["weight"]), expected)


# -- hostile and damaged files --------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    sim = trained_run(tmp_path, rounds=1)
    out = tmp_path / "m.safetensors"
    export_model(sim.run_dir, out)
    return out


def rewrite(path, tensors=None, meta=None):
    """Replace a file's tensors or metadata as a hostile author would: with a matching
    content hash, so the checks behind the hash are what is tested."""
    from safetensors import safe_open

    from fedmef_toolkit.storage import save_safetensors

    with safe_open(str(path), "pt") as f:
        old_meta = f.metadata()
        old = {k: f.get_tensor(k) for k in f.keys()}
    save_safetensors(path, tensors if tensors is not None else old, meta if meta is not None else old_meta)
    return old, old_meta


def csr_name(path):
    layout = json.loads(load_file_meta(path)["layout"])
    return next(n for n, i in layout.items() if i["layout"] == "csr")


def test_truncated_file(exported):
    data = exported.read_bytes()
    for cut in (4, 50, len(data) // 2, len(data) - 3):
        exported.write_bytes(data[:cut])
        with pytest.raises(UserError, match="safetensors"):
            load_model(exported)


def test_header_lies_about_sizes(exported):
    data = bytearray(exported.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 1000
    blob = json.dumps(header).encode()
    exported.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data[8 + n:]))
    with pytest.raises(UserError):
        load_model(exported)
    exported.write_bytes(struct.pack("<Q", 10**12) + bytes(data[8:]))  # header length beyond the file
    with pytest.raises(UserError):
        load_model(exported)


def test_header_lies_about_dtype(exported):
    name = csr_name(exported)
    old, meta = rewrite(exported)
    old[f"{name}.col_indices"] = old[f"{name}.col_indices"].float()
    rewrite(exported, old, meta)
    with pytest.raises(UserError, match="integer dtype"):
        load_model(exported)


@pytest.mark.parametrize("damage", ["col_out_of_range", "col_negative", "crow_not_monotonic", "crow_wrong_length",
                                    "nnz_mismatch", "cols_unsorted"])
def test_bad_indices(exported, damage):
    name = csr_name(exported)
    t, meta = rewrite(exported)
    col, crow = t[f"{name}.col_indices"].clone(), t[f"{name}.crow_indices"].clone()
    if damage == "col_out_of_range":
        col[0] = 30000
    elif damage == "col_negative":
        col[0] = -1
    elif damage == "crow_not_monotonic":
        crow[1], crow[2] = crow[2] + 1, crow[1]
    elif damage == "crow_wrong_length":
        crow = crow[:-1]
    elif damage == "nnz_mismatch":
        t[f"{name}.values"] = t[f"{name}.values"][:-1]
    elif damage == "cols_unsorted":
        row = int((crow[1:] - crow[:-1] >= 2).nonzero()[0])
        a = int(crow[row])
        col[a], col[a + 1] = col[a + 1].clone(), col[a].clone()
    t[f"{name}.col_indices"], t[f"{name}.crow_indices"] = col, crow
    rewrite(exported, t, meta)
    with pytest.raises(UserError, match="invalid sparse file"):
        load_model(exported)


def test_shape_mismatch_with_architecture(exported):
    t, meta = rewrite(exported)
    arch = json.loads(meta["fedmef_arch"])
    arch["kwargs"]["num_classes"] = 7
    meta["fedmef_arch"] = json.dumps(arch)
    rewrite(exported, t, meta)
    with pytest.raises(UserError, match="do not fit"):
        load_model(exported)


def test_unknown_version_and_garbage_layout(exported):
    t, meta = rewrite(exported)
    rewrite(exported, t, {**meta, "format_version": "99"})
    with pytest.raises(UserError, match="version '99'"):
        load_model(exported)
    rewrite(exported, t, {**meta, "layout": "{not json"})
    with pytest.raises(UserError, match="layout"):
        load_model(exported)
    rewrite(exported, t, {**meta, "layout": json.dumps({"x": {"layout": "csr", "shape": [-1, 2], "dtype": "float32"}})})
    with pytest.raises(UserError, match="malformed"):
        load_model(exported)


def test_random_corruption_never_crashes(exported):
    data = exported.read_bytes()
    rng = random.Random(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(60):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        exported.write_bytes(bytes(buf))
        try:
            load_model(exported)
            outcomes["ok"] += 1
        except UserError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_cli_export_inspect_eval(tmp_path):
    sim = trained_run(tmp_path, rounds=1)
    cli = [sys.executable, "-m", "fedmef_toolkit.cli.main"]
    out = tmp_path / "m.safetensors"
    p = subprocess.run(cli + ["export", str(sim.run_dir), "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 0 and "CSR" in p.stdout, p.stderr
    p = subprocess.run(cli + ["inspect", str(out), "--json"], capture_output=True, text=True)
    info = json.loads(p.stdout)
    assert any(r["layout"] == "csr" for r in info["tensors"]) and info["metadata"]["format"] == "fedmef-sparse"
    p = subprocess.run(cli + ["eval", str(out), "--recipe", str(sim.run_dir / "recipe.yaml"), "--device", "cpu"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "accuracy" in p.stdout, p.stderr
    p = subprocess.run(cli + ["eval", str(out), "--dataset", "synthetic", "--device", "cpu"], capture_output=True, text=True)
    assert p.returncode == 2 and "outputs but the data set has 10 classes" in p.stderr
    out.write_bytes(out.read_bytes()[:100])
    p = subprocess.run(cli + ["inspect", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
