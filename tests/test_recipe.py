import subprocess
import sys

import pytest
import yaml

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.recipe import apply_overrides, bundled_recipe_names, load_recipe, recipe_from_dict


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def error_of(tmp_path, data) -> str:
    with pytest.raises(UserError) as exc:
        load_recipe(write(tmp_path, data))
    return str(exc.value)


def test_defaults_are_the_papers_setting():
    r = recipe_from_dict({})
    assert (r.data.num_clients, r.fl.clients_per_round, r.fl.rounds, r.fl.local_epochs, r.fl.batch_size) == (100, 10, 500, 5, 64)
    assert r.data.alpha == 0.5 and r.method.sparsity.density == 0.1
    assert (r.method.sparsity.delta_t, r.method.sparsity.t_end, r.method.sparsity.alpha) == (10, 300, 0.2)
    assert r.method.bae.lam == 0.01 and r.method.sap.gamma == 0.5


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    msg = error_of(tmp_path, {"fl": {"round": 3}})
    assert "r.yaml" in msg and "fl.round" in msg and "did you mean 'fl.rounds'" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, {"fl": {"rounds": "many"}})
    assert "fl.rounds" in msg and "expected int" in msg


def test_bool_is_not_an_int(tmp_path):
    assert "expected int" in error_of(tmp_path, {"fl": {"rounds": True}})


def test_a_nullable_field_says_null_is_allowed(tmp_path):
    assert "channels_last: expected bool or null, got str 'auto'" in error_of(tmp_path, {"channels_last": "auto"})
    assert "expected str or null" in error_of(tmp_path, {"output": {"name": 3}})


def test_out_of_range(tmp_path):
    assert "must be >= 1" in error_of(tmp_path, {"fl": {"batch_size": 0}})
    assert "must be <= 1.0" in error_of(tmp_path, {"method": {"sparsity": {"density": 1.5}}})
    assert "must be > 0.0" in error_of(tmp_path, {"data": {"alpha": 0}})


def test_choice_with_suggestion(tmp_path):
    msg = error_of(tmp_path, {"model": {"arch": "resnet19"}})
    assert "model.arch" in msg and "did you mean 'resnet18'" in msg


def test_inconsistent_settings(tmp_path):
    msg = error_of(tmp_path, {"data": {"num_clients": 5}, "fl": {"clients_per_round": 6}})
    assert "clients_per_round" in msg and "num_clients" in msg


def test_missing_data_path(tmp_path):
    msg = error_of(tmp_path, {"data": {"dataset": "cifar10", "root": str(tmp_path / "nope")}})
    assert "data.root" in msg and "not found" in msg


def test_root_required_for_real_datasets(tmp_path):
    assert "data.root is required" in error_of(tmp_path, {"data": {"dataset": "cinic10"}})


def test_malformed_yaml(tmp_path):
    msg = error_of(tmp_path, "fl: {rounds: 3\nmodel: [")
    assert "malformed YAML" in msg and "r.yaml" in msg


def test_section_must_be_mapping(tmp_path):
    assert "expected a mapping" in error_of(tmp_path, {"fl": 3})


def test_overrides_and_yaml_typing(tmp_path):
    r = load_recipe(write(tmp_path, {}), ["fl.rounds=7", "method.sparsity.density=0.05", "model.norm=nsconv"])
    assert r.fl.rounds == 7 and r.method.sparsity.density == 0.05 and r.model.norm == "nsconv"
    with pytest.raises(UserError, match="expected key.path=value"):
        apply_overrides({}, ["fl.rounds"])


def test_bundled_recipes_by_name_and_all_valid():
    names = bundled_recipe_names()
    for n in ["quickstart.yaml", "resnet18_cifar10.yaml", "mobilenetv2_cifar10.yaml", "resnet18_cinic10.yaml",
              "mobilenetv2_cinic10.yaml", "resnet18_tinyimagenet.yaml", "mobilenetv2_tinyimagenet.yaml"]:
        assert n in names
    assert load_recipe("quickstart").name == "quickstart"
    for n in names:  # every bundled recipe passes validation once its data root exists
        load_recipe(n, ["data.root=.", "data.download=false"] if n != "quickstart.yaml" else [])


def test_cli_error_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, {"fl": {"rounds": -1}})
    proc = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--recipe", path],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "fl.rounds" in lines[0] and "r.yaml" in lines[0]


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "fedmef" in out.stdout
    for cmd in ["train", "recipes"]:
        h = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", cmd, "--help"], capture_output=True, text=True)
        assert h.returncode == 0 and "Usage" in h.stdout


def test_exponent_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads 5e-5 as a string; float fields take it as the number it means."""
    from fedmef_toolkit.recipe import load_recipe

    r = load_recipe("quickstart.yaml", ["fl.weight_decay=5e-5", "fl.lr=1E-3", "fl.agc=2e-1"])
    assert (r.fl.weight_decay, r.fl.lr, r.fl.agc) == (5e-5, 1e-3, 0.2)
    with pytest.raises(UserError, match="fl.lr: expected float"):
        load_recipe("quickstart.yaml", ["fl.lr=e-3"])
    with pytest.raises(UserError, match="fl.rounds: expected int"):
        load_recipe("quickstart.yaml", ["fl.rounds=1e3"])


@pytest.mark.parametrize("text, message", [
    ("", "the recipe is empty"),
    ("name: a\nname: b\n", "duplicate key 'name' at line 2"),
    ("fl:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key 'lr' at line 3"),
    ("a: &x [1, 2]\nb: *x\n", "YAML aliases"),
    ("a: &a [1]\nb: &b [*a, *a]\nc: &c [*b, *b]\n" * 1, "YAML aliases"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("seed: 1180591620717411303424\n", "seed: must be <="),
    ("fl:\n  rounds: 100000000000\n", "fl.rounds: must be <="),
    ("fl:\n  lr: 1.0e308\n", "fl.lr: must be <="),
    ("name: [unclosed\n", "malformed YAML"),
])
def test_hostile_recipes_get_one_line_errors(tmp_path, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_oversized_recipe_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "# padding\n" * 120_000)
    with pytest.raises(UserError, match="larger than 1 MiB"):
        load_recipe(str(path))


def test_override_with_an_alias_is_a_plain_string_refused_by_type(tmp_path):
    with pytest.raises(UserError, match="fl.lr: expected float"):
        load_recipe("quickstart.yaml", ["fl.lr=*x"])


def test_recipe_path_that_is_not_a_file_is_named_as_such(tmp_path):
    with pytest.raises(UserError, match="not a regular file") as err:
        load_recipe(str(tmp_path))  # a directory
    assert str(tmp_path) in str(err.value)
