"""File fuzzing (issue 11): generated corruptions of exported files, checkpoints and
architecture metadata through `inspect_file`, `load_model`, `load_checkpoint` and (a share of
them) `fedmef eval`: no tracebacks, no hangs, bounded memory, every failure one line.

The cases run in a fresh subprocess (this file run as a script) so that its peak resident
memory can be measured: it may grow by at most PEAK_GROWTH_MIB over the same process after
reading the undamaged files. Readers allocate at most 1024 times a file's stored bytes plus
64 MiB (sparse_format.MAX_EXPANSION, EXPANSION_FLOOR), so the bound holds for these ~60 KB
files; without it one of the cases (a small file declaring [64, 2**24]) would take 5 GiB.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

CASES = 1200
PEAK_GROWTH_MIB = 256
MAX_CASE_SECONDS = 10.0


# -- generating the undamaged files ------------------------------------------------------


def make_base_files(tmp: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import small_recipe

    from fedmef_toolkit.convert import convert_file
    from fedmef_toolkit.export.api import export_model
    from fedmef_toolkit.fl.simulator import Simulator
    from fedmef_toolkit.recipe import recipe_from_dict

    recipe = recipe_from_dict(small_recipe(tmp, **{"fl.rounds": 1, "method.name": "fedavg_sparse",
                                                   "method.sparsity.density": 0.2}))
    run = tmp / "run"
    sim = Simulator(recipe, run, show_progress=False)
    sim.write_run_files()
    sim.run()
    files = {"checkpoint": run / "checkpoint.safetensors", "model": run / "model.safetensors"}
    export_model(run, tmp / "m.sparse.safetensors", "sparse-safetensors")
    export_model(run, tmp / "m.dense.safetensors", "safetensors", "fp16")
    files.update(sparse=tmp / "m.sparse.safetensors", dense=tmp / "m.dense.safetensors")
    bn = recipe_from_dict(small_recipe(tmp, **{"fl.rounds": 1, "output.name": "bn"}))
    sim = Simulator(bn, tmp / "bn", show_progress=False)
    sim.write_run_files()
    sim.run()
    convert_file(tmp / "bn" / "model.safetensors", tmp / "conv.safetensors")
    files["converted"] = tmp / "conv.safetensors"
    import yaml

    (tmp / "eval.yaml").write_text(yaml.safe_dump(small_recipe(tmp)))
    return files


# -- corruptions ---------------------------------------------------------------------------

HOSTILE_VALUES = [
    None, True, 0, -1, 2**31, 2**63, 10**30, 1e308, -1e308, float("nan"), "", "x" * 5000, "[/bold]", "[link=x]",
    [], {}, [[[[[]]]]], {"kind": "registry"}, {"kind": "converted"}, {"a": {"b": {"c": 1}}}, [1, 2, 3], "resnet18",
    "torchvision", 200, 8.0, 1e-9, -0.0, 4096, 4097, 7, "nsconv", "active",
]


def _hostile(rng: random.Random):
    return rng.choice(HOSTILE_VALUES)


def _mutate_json(value, rng: random.Random, depth=0):
    """Replace one leaf (or container) of a JSON value by a hostile value."""
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.8:
        key = rng.choice(list(value))
        choice = rng.random()
        if choice < 0.15:
            del value[key]
        elif choice < 0.25:
            value["extra" + str(rng.randint(0, 9))] = _hostile(rng)
        else:
            value[key] = _mutate_json(value[key], rng, depth + 1)
        return value
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.8:
        i = rng.randrange(len(value))
        value[i] = _mutate_json(value[i], rng, depth + 1)
        return value
    return _hostile(rng)


def _read(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _resave(tensors, meta, rehash: bool) -> bytes:
    """The file's bytes; with rehash a matching content hash (a hostile author can compute it)."""
    from safetensors.torch import save

    from fedmef_toolkit.storage import HASH_KEY, content_hash

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    if rehash:
        meta[HASH_KEY] = content_hash(tensors, meta)
    return save(tensors, metadata=meta)


def corrupt(kind: str, base: bytes, path: Path, rng: random.Random) -> bytes:
    import torch

    data = bytearray(base)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: rng.randrange(len(data))])
    if kind == "header_len":
        return struct.pack("<Q", rng.choice([0, 1, 7, len(data), 2**40, rng.randrange(2**20)])) + bytes(data[8:])
    if kind == "splice":
        i, j = sorted(rng.randrange(len(data)) for _ in range(2))
        return bytes(data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[j:])
    tensors, meta = _read(path)
    rehash = rng.random() < 0.85
    if kind == "metadata":
        key = rng.choice([k for k in meta if k != "fedmef_sha256"] + ["fedmef_arch", "layout", "format"])
        try:
            value = json.loads(meta.get(key, "null"))
            value = _mutate_json(value, rng)
        except ValueError:
            value = _hostile(rng)
        meta[key] = value if isinstance(value, str) else json.dumps(value)
        if rng.random() < 0.05:
            meta[key] = "[" * 100_000
    elif kind == "arch":  # architecture descriptions: valid JSON, hostile content
        desc = json.loads(meta.get("fedmef_arch", '{"kind": "registry", "kwargs": {"name": "cnn4"}}'))
        if rng.random() < 0.5 and desc.get("kind") == "registry":
            desc["kwargs"][rng.choice(["width", "num_classes", "image_size", "name", "norm", "nsconv_eps",
                                       "nsconv_alpha", "nsconv_stats"])] = _hostile(rng)
        else:
            desc = _mutate_json(desc, rng)
        meta["fedmef_arch"] = json.dumps(desc)
    elif kind == "layout" and "layout" in meta:  # shapes declared bigger than the file
        layout = json.loads(meta["layout"])
        name = rng.choice(list(layout))
        layout[name]["shape"] = rng.choice([[64, 2**24], [2**31 - 1, 2**31 - 1], [0, 5], [-1, 3], [3], [1] * 9,
                                            [2**20, 2**20, 2**20]])
        if rng.random() < 0.5:
            layout[name]["layout"] = rng.choice(["csr", "dense", "coo", None])
        meta["layout"] = json.dumps(layout)
    else:  # tensors: dropped, added, retyped, reshaped or with wild index values
        name = rng.choice(list(tensors))
        t = tensors[name]
        op = rng.randrange(5)
        if op == 0:
            del tensors[name]
        elif op == 1:
            tensors[name + rng.choice(["", ".x", "_mask"])] = torch.zeros(rng.randint(0, 9))
        elif op == 2:
            tensors[name] = t.to(rng.choice([torch.float64, torch.int8, torch.bool, torch.int64, torch.float16]))
        elif op == 3 and t.numel():
            tensors[name] = t.reshape(-1)[: max(1, t.numel() // rng.choice([1, 2, 3]))]
        else:
            tensors[name] = torch.randint(-(2**15), 2**15, t.shape).to(t.dtype) if t.numel() else t
    if rng.random() < 0.05:
        meta.pop("fedmef_sha256", None)
        rehash = False
    return _resave(tensors, meta, rehash)


KINDS = ["flip", "flip", "truncate", "header_len", "splice", "metadata", "metadata", "arch", "arch", "layout", "tensor"]


# -- running the readers ----------------------------------------------------------------


def run_readers(path: Path, ckpt_dir: Path, do_eval: bool, eval_recipe: Path) -> list[str]:
    """Outcomes ('ok' or the one-line error) of every reader on one file; raises on anything
    that is not the toolkit's error type."""
    import shutil

    from click.testing import CliRunner

    from fedmef_toolkit.cli.main import main
    from fedmef_toolkit.errors import UserError
    from fedmef_toolkit.export.api import inspect_file, load_model, load_sparse
    from fedmef_toolkit.fl.checkpoint import load_checkpoint

    outcomes = []
    shutil.copyfile(path, ckpt_dir / "checkpoint.safetensors")
    for fn in (lambda: inspect_file(path), lambda: load_model(path), lambda: load_sparse(path),
               lambda: load_checkpoint(ckpt_dir)):
        try:
            fn()
            outcomes.append("ok")
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 900, f"not one line: {message[:300]!r}"
            outcomes.append(message)
    if do_eval:
        res = CliRunner().invoke(main, ["eval", str(path), "--recipe", str(eval_recipe)])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert res.exit_code in (0, 1, 2), res.output
        if res.exit_code:
            lines = res.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), res.output[-500:]
    return outcomes


def fuzz(workdir: Path, cases: int, seed: int = 0) -> dict:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    files = {p.stem: p for p in sorted((workdir / "base").glob("*.safetensors"))}
    ckpt_dir = workdir / "ckpt"
    ckpt_dir.mkdir(exist_ok=True)
    eval_recipe = workdir / "base" / "eval.yaml"
    for path in files.values():  # warm up: every reader once on undamaged files
        run_readers(path, ckpt_dir, True, eval_recipe)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng = random.Random(seed)
    slowest, refused, accepted = 0.0, 0, 0
    case_file = workdir / "case.safetensors"
    for i in range(cases):
        base = rng.choice(sorted(files))
        kind = rng.choice(KINDS)
        case_file.write_bytes(corrupt(kind, files[base].read_bytes(), files[base], rng))
        t0 = time.perf_counter()
        try:
            outcomes = run_readers(case_file, ckpt_dir, i % 25 == 0, eval_recipe)
        except AssertionError as exc:
            raise AssertionError(f"case {i} ({kind} of {base}): {exc}") from None
        except Exception as exc:
            raise AssertionError(f"case {i} ({kind} of {base}): traceback {type(exc).__name__}: {exc}") from None
        slowest = max(slowest, time.perf_counter() - t0)
        refused += outcomes[1] != "ok"
        accepted += outcomes[1] == "ok"
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"cases": cases, "load_model_refused": refused, "load_model_accepted": accepted,
            "slowest_case_s": round(slowest, 3), "rss_after_warmup_mib": round(rss0 / 1024, 1),
            "peak_rss_mib": round(rss1 / 1024, 1), "growth_mib": round((rss1 - rss0) / 1024, 1)}


def test_thousand_corrupted_files_give_one_line_errors_in_bounded_memory(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name, path in make_base_files(tmp_path).items():
        (base / f"{name}.safetensors").write_bytes(path.read_bytes())
    (base / "eval.yaml").write_text((tmp_path / "eval.yaml").read_text())
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(CASES)], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print(stats)
    assert stats["cases"] >= 1000
    assert stats["load_model_refused"] > 0.75 * CASES  # corruptions are caught, not loaded
    assert stats["slowest_case_s"] < MAX_CASE_SECONDS
    assert stats["growth_mib"] < PEAK_GROWTH_MIB, stats


def test_a_few_corrupted_files_through_the_cli(tmp_path):
    base = make_base_files(tmp_path)
    rng = random.Random(1)
    cli = [sys.executable, "-m", "fedmef_toolkit.cli.main"]
    for i, (kind, command) in enumerate([("layout", "inspect"), ("arch", "eval"), ("flip", "eval")]):
        path = tmp_path / f"bad{i}.safetensors"
        path.write_bytes(corrupt(kind, base["sparse"].read_bytes(), base["sparse"], rng))
        args = [command, str(path)] + (["--recipe", str(tmp_path / "eval.yaml")] if command == "eval" else [])
        proc = subprocess.run(cli + args, capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")


if __name__ == "__main__":
    print(json.dumps(fuzz(Path(sys.argv[1]), int(sys.argv[2]))))
