"""Full disks, read-only locations and bad output paths (issue 11): one-line errors naming the
path, exit code 1 (2 for what the recipe or command line got wrong), nothing already written
damaged. A full disk and a read-only file system are simulated with the fault hook
(FEDMEF_FAULT=<point>,<n>,enospc|erofs), which works as root too; a real read-only directory
(chmod) is used where the tests do not run as root (root writes through it)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import make_image_tree, png_bytes, small_recipe
from safetensors.torch import load_file

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.fl.checkpoint import load_checkpoint

FEDMEF = [sys.executable, "-m", "fedmef_toolkit.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args, fault=None, **kw):
    env = {**ENV, "FEDMEF_FAULT": fault} if fault else ENV
    return subprocess.run(FEDMEF + args, capture_output=True, text=True, env=env, timeout=300, **kw)


def _one_line_error(proc, code, path_part):
    assert proc.returncode == code, proc.stderr[-800:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error:"), proc.stderr[-800:]
    assert path_part in lines[-1], lines[-1]
    return lines[-1]


def _recipe(tmp_path, name, **over):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tmp_path, **{"output.name": name, **over})))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("io")
    proc = _run(["train", "--no-progress", "--recipe", str(_recipe(tmp, "done", **{"fl.rounds": 2}))])
    assert proc.returncode == 0, proc.stderr
    return tmp / "runs" / "done"


def _snapshot(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fault", ["partial:checkpoint.safetensors,2,enospc", "partial:metrics.jsonl,3,erofs"])
def test_full_disk_or_read_only_while_training_stops_in_one_line_and_resumes(tmp_path, fault):
    run_dir = tmp_path / "runs" / "r"
    proc = _run(["train", "--no-progress", "--recipe", str(_recipe(tmp_path, "r", **{"fl.rounds": 4}))], fault)
    line = _one_line_error(proc, 1, str(run_dir))
    assert "--resume" in line and ("No space left" in line or "Read-only" in line)
    assert not list(run_dir.glob("*.tmp"))
    assert load_checkpoint(run_dir)[2]["round"] in (0, 2)  # the last checkpoint is intact
    done = _run(["train", "--no-progress", "--resume", str(run_dir)])
    assert done.returncode == 0, done.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


def test_full_disk_on_resume_leaves_the_run_as_it_was(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    first = _run(["train", "--no-progress", "--recipe", str(_recipe(tmp_path, "r", **{"fl.rounds": 3}))],
                 "appended:metrics.jsonl,1,kill")
    assert first.returncode < 0
    before = _snapshot(run_dir)
    proc = _run(["train", "--no-progress", "--resume", str(run_dir)], "truncate:metrics.jsonl,1,erofs")
    _one_line_error(proc, 1, "metrics.jsonl")
    assert _snapshot(run_dir) == before


def _cli(args, monkeypatch, fault=None):
    """`fedmef ARGS` in this process (fast); (exit code, output lines)."""
    from click.testing import CliRunner

    from fedmef_toolkit import storage
    from fedmef_toolkit.cli.main import main

    storage._fault_counts.clear()
    if fault:
        monkeypatch.setenv("FEDMEF_FAULT", fault)
    else:
        monkeypatch.delenv("FEDMEF_FAULT", raising=False)
    res = CliRunner().invoke(main, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output.strip().splitlines()


def _one_line(result, code, part):
    exit_code, lines = result
    assert exit_code == code and lines and lines[-1].startswith("error:") and part in lines[-1], (exit_code, lines)


@pytest.mark.parametrize("fault", ["partial:*,1,enospc", "written:*,1,erofs", "partial:*,1,eacces"])
def test_export_and_convert_to_a_full_or_read_only_disk_keep_the_old_file(tmp_path, finished_run, fault,
                                                                          monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous export")
    _one_line(_cli(["export", str(finished_run), "-o", str(out)], monkeypatch, fault), 1, str(out))
    _one_line(_cli(["convert", str(finished_run / "model.safetensors"), "-o", str(out)], monkeypatch, fault), 1,
              str(out))
    assert out.read_bytes() == b"the previous export" and not list(tmp_path.glob("*.tmp"))


def test_output_locations_that_cannot_work(tmp_path, finished_run, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = _snapshot(finished_run)
    train = ["train", "--no-progress", "--recipe"]
    _one_line(_cli(train + [str(_recipe(tmp_path, "r")), "--set", f"output.dir={blocker}/runs"], monkeypatch), 1,
              str(blocker))
    _one_line(_cli(["export", str(finished_run), "-o", str(blocker / "x.safetensors")], monkeypatch), 1, str(blocker))
    _one_line(_cli(["export", str(finished_run), "-o", str(tmp_path)], monkeypatch), 1, str(tmp_path))
    _one_line(_cli(["convert", str(finished_run / "model.safetensors"), "--image-size", "0"], monkeypatch), 2,
              "--image-size")
    _one_line(_cli(train + [str(_recipe(tmp_path, "done")), "--set", f"output.dir={finished_run.parent}"],
                   monkeypatch), 2, "already exists")
    assert _snapshot(finished_run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the erofs/eacces fault "
                                              "hook cases above cover the same code paths")
def test_a_read_only_directory(tmp_path, finished_run):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = _run(["train", "--no-progress", "--recipe", str(_recipe(tmp_path, "r")), "--set", f"output.dir={ro}"])
        _one_line_error(proc, 1, str(ro))
        proc = _run(["export", str(finished_run), "-o", str(ro / "m.safetensors")])
        _one_line_error(proc, 1, str(ro))
    finally:
        ro.chmod(0o755)


# -- data ----------------------------------------------------------------------------------


def _bomb_png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [9000, 14000])  # over our 67 Mpixel bound; over PIL's own bomb limit
def test_decompression_bomb_is_one_line(tmp_path, size):
    from fedmef_toolkit.data.sources import read_image_folder

    root = make_image_tree(tmp_path / "d", splits=("train",))
    (root / "train" / "cat" / "bomb.png").write_bytes(_bomb_png(size))
    with pytest.raises(UserError, match="bomb|pixels") as exc:
        read_image_folder(root, 8)
    assert "\n" not in str(exc.value)


def test_zip_member_climbing_out_is_refused(tmp_path):
    from fedmef_toolkit.data.sources import read_image_folder

    rng = __import__("numpy").random.default_rng(0)
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"train/cat/{i}.png", png_bytes(rng))
        zf.writestr("train/../../../tmp/x.png", png_bytes(rng))
    with pytest.raises(UserError, match="'\\.\\.'"):
        read_image_folder(archive, 8)
    assert not (tmp_path / "tmp").exists()


def test_empty_validation_set_is_an_error_not_accuracy_zero(tmp_path):
    from fedmef_toolkit.data import load_data
    from fedmef_toolkit.recipe import DataSpec

    root = make_image_tree(tmp_path / "d", splits=("train",), per_class=3)
    spec = DataSpec(dataset="imagefolder", root=str(root), val_split=0.1)
    with pytest.raises(UserError, match="validation set is empty"):
        load_data(spec, "val", 0)


def test_recipe_synthetic_size_bound(tmp_path):
    from fedmef_toolkit.recipe import recipe_from_dict

    with pytest.raises(UserError, match="data.synthetic"):
        recipe_from_dict(small_recipe(tmp_path, **{"data.synthetic.num_samples": 9_000_000,
                                                  "data.synthetic.image_size": 256}))


def test_files_without_a_hash_are_accepted_and_said_to_be(tmp_path, finished_run):
    from safetensors.torch import save_file

    from fedmef_toolkit.export.api import inspect_file, load_model
    from fedmef_toolkit.storage import HASH_KEY
    from safetensors import safe_open

    with safe_open(str(finished_run / "model.safetensors"), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != HASH_KEY}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(finished_run / "model.safetensors")), str(old), metadata=meta)
    assert inspect_file(old)["hash"] == "absent" and inspect_file(finished_run / "model.safetensors")["hash"] == "verified"
    load_model(old)
    flipped = bytearray((finished_run / "model.safetensors").read_bytes())
    flipped[-5] ^= 1
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="content hash mismatch"):
        load_model(tmp_path / "flipped.safetensors")


def test_a_real_full_disk_while_logging_metrics_names_the_file(tmp_path):
    """/dev/full fails every write with ENOSPC: the one-line error names the file (no second,
    path-less error from a buffered flush at close)."""
    from fedmef_toolkit.storage import StorageError, append_line, open_append

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    with pytest.raises(StorageError, match="metrics.jsonl"):
        with open_append(Path("/dev/full")) as log:
            append_line(log, tmp_path / "metrics.jsonl", '{"round": 1}')


def test_a_second_process_cannot_write_a_locked_run(tmp_path):
    from fedmef_toolkit.errors import UserError
    from fedmef_toolkit.storage import lock_run_dir

    held = lock_run_dir(tmp_path)
    try:
        with pytest.raises(UserError, match="in use by another fedmef process"):
            lock_run_dir(tmp_path)  # flock locks are per open file: a second open is refused
    finally:
        held.close()
    lock_run_dir(tmp_path).close()  # free again once released
