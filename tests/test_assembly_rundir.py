"""Issue 12: one model-assembly seam, one run directory, and the defects a new user hit."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import torch.nn as nn
import yaml
from click.testing import CliRunner
from conftest import small_recipe

from fedmef_toolkit import rundir
from fedmef_toolkit.cli.main import main
from fedmef_toolkit.models import get_model


def invoke(*args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)
    return result


def write_recipe(tmp_path, name="r.yaml", **over):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(small_recipe(tmp_path, **over)))
    return path


def test_no_import_cycle_between_architecture_convert_and_export():
    import ast
    from pathlib import Path

    import fedmef_toolkit

    root = Path(fedmef_toolkit.__file__).parent
    text = (root / "architecture.py").read_text()
    mods = {n.module for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom) and n.module}
    assert "convert" not in mods and not any(m.startswith("export.io") or m == "export.api" for m in mods)


def test_memory_json_describes_the_converted_model_that_trained(tmp_path):
    """Defect 1: model.init -> a converted model; header, recipe.yaml and memory.json name it."""
    src = tmp_path / "cnn.pt"
    torch.save(get_model("cnn4", 4, width=0.5).state_dict(), src)
    conv = tmp_path / "cnn_ns.safetensors"
    out = invoke("convert", src, "--arch", "cnn4", "--image-size", 12, "-o", conv)
    assert out.exit_code == 0 and "Fine-tune it" in out.output and "output change (relative)" in out.output
    # the recipe says resnet18 width 0.25; the file's converted cnn4 (width 0.5) is what trains
    recipe = write_recipe(tmp_path, **{"fl.rounds": 1, "model.init": str(conv), "model.arch": "resnet18",
                                       "output.memory_report": True})
    res = invoke("train", "--recipe", recipe, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "converted registry cnn4" in res.output
    run = rundir.RunDir(tmp_path / "runs" / "run")
    from fedmef_toolkit.convert import load_converted

    trained = load_converted(run.model)
    mem = json.loads(run.memory_json.read_text())
    subject = mem["configurations"][0]
    assert subject["architecture"]["kind"] == "converted"
    assert subject["parameters"] == sum(p.numel() for p in trained.parameters())
    assert subject["arch"].startswith("converted")
    assert mem["configurations"][1]["parameters"] > 0  # the BN original as reference
    assert run.recipe.read_text().startswith("# model trained: converted registry cnn4")


def test_convert_pickle_does_not_recommend_model_init(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.save(model, tmp_path / "m.pt")
    res = invoke("convert", tmp_path / "m.pt", "--trust-pickle", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 0, res.output
    assert "cannot train it" in res.output and "--set model.init=" not in res.output


def test_resume_extends_a_finished_run_and_exports_checkpoint_only(tmp_path):
    """Defect 3: --resume --set fl.rounds=N extends; other keys are refused; a run with only a
    checkpoint exports."""
    recipe = write_recipe(tmp_path, **{"fl.rounds": 2, "method.name": "fedavg_sparse",
                                       "method.sparsity.density": 0.5})
    assert invoke("train", "--recipe", recipe, "--no-progress").exit_code == 0
    run = rundir.RunDir(tmp_path / "runs" / "run")
    refused = invoke("train", "--resume", run, "--set", "fl.lr=0.1")
    assert refused.exit_code == 2 and "only --set fl.rounds=N" in refused.output
    res = invoke("train", "--resume", run, "--set", "fl.rounds=3", "--no-progress")
    assert res.exit_code == 0, res.output
    assert [r["round"] for r in run.read_metrics()] == [1, 2, 3]
    assert "rounds: 3" in run.recipe.read_text()
    assert invoke("train", "--resume", run, "--no-progress").exit_code == 0  # resumes with the new recipe
    run.model.unlink()  # a run that has only its checkpoint
    res = invoke("export", run, "-o", tmp_path / "e.safetensors")
    assert res.exit_code == 0, res.output
    info = invoke("inspect", tmp_path / "e.safetensors", "--json")
    doc = json.loads(info.output)
    assert doc["metadata"]["provenance"]["round"] == 3  # a JSON number, not "3" nor a nested string
    assert isinstance(doc["metadata"]["fedmef_arch"], dict)


def test_dense_sparse_export_warns_and_files_are_0644(tmp_path):
    """Defect 6: a dense model exported as sparse warns; outputs get 0644 under umask 022."""
    recipe = write_recipe(tmp_path, **{"fl.rounds": 1})
    old = os.umask(0o022)
    try:
        assert invoke("train", "--recipe", recipe, "--no-progress").exit_code == 0
        run = rundir.RunDir(tmp_path / "runs" / "run")
        res = invoke("export", run)
        assert res.exit_code == 0
        assert "warning" in res.output and "larger than the dense" in res.output
        for f in (run.model, run.checkpoint, run.export_path("sparse-safetensors"), run.recipe, run.metrics):
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    finally:
        os.umask(old)


def test_report_recipe_needs_no_data_set_and_fits_80_columns(tmp_path):
    """Defects 5 and 7: a CIFAR-10 recipe is sized without the data set; 80-column output."""
    res = invoke("report", "fedmef_resnet18_cifar10.yaml", "--set", "model.arch=cnn4", "--set", "fl.batch_size=4",
                 "--set", f"data.root={tmp_path / 'absent'}", "--device", "cpu", "-o", tmp_path, terminal_width=80,
                 env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output
    assert "activations, measured" in res.output
    mem = json.loads((tmp_path / "memory.json").read_text())
    assert mem["num_classes"] == 10 and mem["input_shape"] == [3, 32, 32]
    ref = invoke("recipes", "--reference", env={"COLUMNS": "80"})
    assert all(len(line) <= 80 for line in ref.output.splitlines())
    assert "method.sparsity.density: float = 0.1" in ref.output


def test_no_progress_keeps_round_lines(tmp_path):
    recipe = write_recipe(tmp_path, **{"fl.rounds": 2})
    res = invoke("train", "--recipe", recipe, "--no-progress")
    assert "round 1:" in res.output and "round 2:" in res.output


def test_python_api_trains(tmp_path):
    import fedmef_toolkit

    result = fedmef_toolkit.train(write_recipe(tmp_path, **{"fl.rounds": 1}), {"output.name": "api"})
    assert result.run_dir.name == "api" and result.metrics[0]["round"] == 1
    assert (result.run_dir / rundir.MODEL).exists()
