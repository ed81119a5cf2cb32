"""`fedmef compare` on runs made here: table contents, grouping, PNGs, bad run directories."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import small_recipe

from fedmef_toolkit.cli.main import main
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for method, extra in [("fedavg", {"output.memory_report": True}),
                          ("prunefl", {"method.prunefl.init_max_iters": 2}),
                          ("fedtiny", {})]:
        rec = small_recipe(root, **{"method.name": method, "fl.rounds": 4, "eval.every": 2, "output.name": method,
                                    "method.sparsity.density": 0.3, "method.sparsity.delta_t": 2,
                                    "method.sparsity.t_end": 3, **extra})
        sim = Simulator(recipe_from_dict(rec), root / "runs" / method, show_progress=False)
        sim.write_run_files()
        if method == "fedavg":
            from fedmef_toolkit.memory.report import write_report_for_simulator

            write_report_for_simulator(sim, quiet=True)
        sim.run()
        out[method] = sim.run_dir
    other = root / "runs" / "other_model"  # the same run as if trained on another model: its own group
    shutil.copytree(out["fedavg"], other)
    (other / "recipe.yaml").write_text((other / "recipe.yaml").read_text().replace("arch: cnn4", "arch: resnet_narrow"))
    out["other"] = other
    return out


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compare_table_contents_and_pngs(runs, tmp_path):
    res = CliRunner().invoke(main, ["compare", *map(str, runs.values()), "-o", str(tmp_path / "cmp")],
                             terminal_width=250)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    by_run = {r["run"]: r for r in rows}
    assert [r["run"] for r in rows] == ["fedavg", "prunefl", "fedtiny", "other_model"]
    assert {r["method"] for r in rows} == {"fedavg", "prunefl", "fedtiny"}
    assert by_run["fedavg"]["density"] == "1" and by_run["prunefl"]["density"] == "0.3"
    assert by_run["other_model"]["group"] == "synthetic / resnet_narrow"
    assert {by_run[n]["group"] for n in ("fedavg", "prunefl", "fedtiny")} == {"synthetic / cnn4"}
    for name in ("fedavg", "prunefl", "fedtiny"):
        m = metrics(runs[name])
        accs = [r["eval_acc"] for r in m if "eval_acc" in r]
        assert by_run[name]["rounds"] == "4/4"
        assert float(by_run[name]["best acc"]) == pytest.approx(max(accs), abs=1e-4)
        assert float(by_run[name]["final acc"]) == pytest.approx(accs[-1], abs=1e-4)
        assert by_run[name]["acc@2"] != "" and by_run[name]["acc@4"] != ""
        assert float(by_run[name]["wall time s"]) == pytest.approx(sum(r["time_s"] for r in m), abs=0.06)
        assert by_run[name]["bytes up"].split()[1] in ("KiB", "MiB")
    for name in ("fedavg", "prunefl"):  # totals (PruneFL's include its initial pruning, round 0)
        total = metrics(runs[name])[-1]["bytes_up_total"]
        assert sum(r["bytes_up"] for r in metrics(runs[name])) == total
        assert by_run[name]["bytes up"] == f"{total / 2**10:.2f} KiB"
    mem = json.loads((runs["fedavg"] / "memory.json").read_text())["configurations"][0]["paper_figure"]
    assert float(by_run["fedavg"]["client memory MiB"]) == pytest.approx(mem / 2**20, abs=0.01)
    assert by_run["prunefl"]["client memory MiB"] == "-"
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("\n") == 2 + len(rows) and "| fedtiny |" in md
    assert "fedtiny" in res.output and "compare.md" in res.output
    pytest.importorskip("matplotlib")
    for png in ("compare_accuracy.png", "compare_resources.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_matplotlib_writes_tables(runs, tmp_path, monkeypatch):
    import fedmef_toolkit.compare as cmp

    monkeypatch.setattr(cmp, "_pyplot", lambda: None)
    res = CliRunner().invoke(main, ["compare", str(runs["fedavg"]), "-o", str(tmp_path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "plots need matplotlib" in res.output
    assert (tmp_path / "compare.csv").exists() and not (tmp_path / "compare_accuracy.png").exists()


def test_compare_bad_run_dirs_are_one_line_errors(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(runs["fedavg"], broken)
    (broken / "metrics.jsonl").write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    for path, why in [(tmp_path / "missing", "not a run directory"), (empty, "no recipe.yaml"),
                      (broken, "line 2 of metrics.jsonl is not JSON")]:
        res = CliRunner().invoke(main, ["compare", str(runs["fedavg"]), str(path), "-o", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        err = res.output.strip()
        assert err.count("\n") == 0 and why in err and str(path) in err


def test_compare_table_fits_80_columns_without_cutting_a_cell(runs, tmp_path):
    """Too wide for the terminal, the table is transposed (a quantity per row, a run per
    column): every value is printed whole."""
    from rich.console import Console

    from fedmef_toolkit.compare import comparison_rows, load_run, render_table

    header, rows = comparison_rows([load_run(runs[n]) for n in ("fedavg", "prunefl", "fedtiny")])
    console = Console(width=80, record=True, color_system=None)
    render_table(header, rows, console)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for row in rows:
        assert all(cell in text for cell in row[1:] if cell)  # every value, whole
