"""Recipe fuzzing (issue 11): hostile recipes and `--set` values through `fedmef train`
(in-process, plus a few as real processes): every one exit code 2 with one line naming the
key (or, for what is wrong with the YAML itself, the recipe file), nothing run or executed."""

from __future__ import annotations

import subprocess
import sys

import yaml
from click.testing import CliRunner
from conftest import small_recipe

from fedmef_toolkit.cli.main import main

NUMERIC_KEYS = ["seed", "fl.rounds", "fl.local_epochs", "fl.batch_size", "fl.clients_per_round", "fl.lr",
                "fl.momentum", "fl.weight_decay", "fl.agc", "data.num_clients", "data.alpha", "data.val_split",
                "data.min_samples", "data.synthetic.num_samples", "data.synthetic.image_size",
                "data.synthetic.num_classes", "model.width", "method.sparsity.density", "eval.every",
                "eval.batch_size", "output.checkpoint_every"]
HOSTILE_NUMBERS = ["2**70", "1208925819614629174706176", "-1", "1e308", "1e400", ".nan", "-.inf", "[1, 2]", "{a: 1}",
                   "true", "'12abc'", "0x7fffffffffffffffffff"]
PATH_KEYS = {"output.dir": ["a\x00b", "x" * 5000, "/" + "y" * 300 + "/z"],
             "output.name": ["a/b", "..", "n\x00", "z" * 300],
             "name": ["../escape", "q" * 300],
             "model.init": ["/nonexistent/model.safetensors", "m\x00.safetensors"],
             "data.cache_dir": ["c\x00"]}


def set_cases():
    """(--set arguments, the key the error must name)."""
    cases = []
    for key in NUMERIC_KEYS:
        cases += [([f"{key}={value}"], key) for value in HOSTILE_NUMBERS]
    for key, values in PATH_KEYS.items():
        cases += [([f"{key}={v}"], key) for v in values]
    cases += [
        (["data.synthetic.num_samples=10000000", "data.synthetic.image_size=256"], "data.synthetic"),
        (["fl.clients_per_round=9"], "fl.clients_per_round"),
        (["fl.engine=threads"], "fl.engine"),
        (["model.arch=resnet1000"], "model.arch"),
        (["fl.rounds"], "fl.rounds"),
        (["fl.nope=1"], "fl.nope"),
        (["fl.rounds.x=1"], "fl.rounds"),
        (["device=cuda:x"], "device"),
    ]
    return cases


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def yaml_cases(tmp_path):
    """(recipe text, what the error must name)."""
    base = yaml.safe_dump(small_recipe(tmp_path))
    sentinel = tmp_path / "executed"
    return [
        ("", "r.yaml"),
        ("# only a comment\n", "r.yaml"),
        (ALIAS_BOMB, "r.yaml"),
        ("a: " + "[" * 5000 + "]" * 5000, "r.yaml"),
        ("fl:\n  rounds: 2\n  rounds: 3\n", "rounds"),
        (base + "seed: 1\nseed: 2\n", "seed"),
        (f"!!python/object/apply:os.system ['touch {sentinel}']\n", "r.yaml"),
        (f"fl: !!python/object/apply:os.system ['touch {sentinel}']\n", "r.yaml"),
        ("seed: !!python/name:os.system\n", "r.yaml"),
        ("- 1\n- 2\n", "r.yaml"),
        ("just a string", "r.yaml"),
        ("fl: [1, 2]\n", "fl"),
        ("fl:\n  rounds: {a: b}\n", "fl.rounds"),
        ("{{{{", "r.yaml"),
        ("\tfl: 1\n", "r.yaml"),
        ("x: " + "y" * (2 << 20), "r.yaml"),
        ("? [a, b]\n: 1\n", "r.yaml"),
        ("seed: 99999999999999999999999999999\n", "seed"),
        ("fl:\n  lr: 1e999\n", "fl.lr"),
        ("model:\n  width: -0.0\n", "model.width"),
    ]


def _check(res, named: str, tmp_path):
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output[-500:]
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output[-500:]
    assert named in lines[0], (named, lines[0])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "executed").exists()


def test_hostile_recipes_and_set_values_are_refused_in_one_line(tmp_path):
    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(tmp_path)))
    count = 0
    for sets, key in set_cases():
        args = ["train", "--no-progress", "--recipe", str(recipe)]
        for s in sets:
            args += ["--set", s]
        _check(runner.invoke(main, args), key, tmp_path)
        count += 1
    for text, named in yaml_cases(tmp_path):
        recipe.write_text(text)
        _check(runner.invoke(main, ["train", "--no-progress", "--recipe", str(recipe)]), named, tmp_path)
        count += 1
    assert count >= 100


def test_a_few_hostile_recipes_through_the_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    cli = [sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--no-progress", "--recipe", str(recipe)]
    for text, named in yaml_cases(tmp_path)[2:4] + [(yaml.safe_dump(small_recipe(tmp_path)), "seed")]:
        recipe.write_text(text)
        proc = subprocess.run(cli + (["--set", "seed=2**70"] if named == "seed" else []), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and named in proc.stderr
    assert not (tmp_path / "runs").exists()
