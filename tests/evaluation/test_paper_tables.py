"""benchmarks/paper_tables.py: scale selection, table format and target checks (no training)."""
import importlib.util
import pathlib

import pytest


@pytest.fixture(scope="module")
def bench():
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "paper_tables.py"
    spec = importlib.util.spec_from_file_location("paper_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scales_come_from_the_flags(bench):
    assert bench.parse_scales(bench.parse_args([])) == []
    assert bench.parse_scales(bench.parse_args(["--guidance-scale", "3"])) == [3.0]
    assert bench.parse_scales(bench.parse_args(["--scales", "1, 2,4"])) == [1.0, 2.0, 4.0]
    with pytest.raises(SystemExit, match="--scales: expected comma-separated numbers"):
        bench.parse_scales(bench.parse_args(["--scales", "1,two"]))


def test_best_row_is_the_lowest_distance(bench):
    rows = [{"guidance_scale": 1.0, "fd_x": 3.0, "box_iou": 0.4}, {"guidance_scale": 2.0, "fd_x": 2.5, "box_iou": 0.6},
            {"guidance_scale": 4.0, "fd_x": 2.9, "box_iou": 0.7}]
    assert bench.best_row(rows)["guidance_scale"] == 2.0
    assert bench.best_row([{"guidance_scale": 1.0}, {"guidance_scale": 2.0}])["guidance_scale"] == 1.0


def test_tables_show_the_scale_and_targets_fail_when_missed(bench):
    rows = [
        {"variant": "no-guidance", "fd_x": 4.0, "guidance_scale": None, "train_s": 10},
        {"variant": "self-label", "fd_x": 2.9, "guidance_scale": 2.0, "train_s": 11},
        {"variant": "gt-label", "fd_x": 4.5, "guidance_scale": 1.0, "train_s": 11},
        {"variant": "self-box", "fd_x": 3.0, "guidance_scale": 2.0, "box_iou": 0.55, "box_hit50": 0.6, "train_s": 12},
    ]
    text = bench.format_tables(rows, "fd_x")
    assert "| no guidance | 4 | - |" in text and "| self-labeled | 2.9 | 2 |" in text and "| self-boxed | 3 | 2 | 0.55 |" in text
    checks = dict((t.split(" ")[0] + (" drop" if "below no guidance (target" in t else ""), ok)
                  for t, ok in bench.check_targets(rows, "fd_x"))
    assert checks["self-label"] and not checks["gt-label"] and checks["self-labeled drop"]  # 27.5% below
    assert checks["self-box"]  # IoU 0.55 >= 0.5
