"""write_report's own files, without models: a stand-in pipeline draws random images and the
evaluations are stubbed (their plumbing is tests/evaluation's), so each test takes well under a second."""
import pytest
import torch

import sgdm.quickstart.report as report
from sgdm.config.schema import load_experiment
from tests.quickstart.helpers import CONFIG, tiny_overrides


class _Pipe:
    """Random images [n, 3, 8, 8] in [0, 1], different at every call (so every report differs)."""

    calls = 0

    def __call__(self, n, **kwargs):
        _Pipe.calls += 1
        return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(_Pipe.calls))


@pytest.fixture
def scales_evaluated(monkeypatch):
    """The guidance scales each (stubbed) evaluation of write_report was asked for."""
    from sgdm.pipeline import SelfGuidedPipeline

    seen = []

    def evaluate(run_dir, cfg, scales, log, out_dir):
        seen.append(list(scales))
        return [{"guidance_scale": s, "fd_tiny": 1.0 + s} for s in scales]

    monkeypatch.setattr(SelfGuidedPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: _Pipe()))
    monkeypatch.setattr(report, "_evaluate", evaluate)
    return seen


def _report(tmp_path, *overrides):
    cfg = load_experiment(CONFIG, [*tiny_overrides(tmp_path), "prepare.report_companions=false", *overrides])
    return report.write_report(cfg, tmp_path / "run", log=lambda m: None)


def _table(md: str) -> list[str]:
    start = md.index("## Metrics")
    return [line for line in md[start:].splitlines() if line.startswith("|")]


@pytest.mark.parametrize("w,expected", [(0.0, [0.0]), (2.0, [0.0, 2.0])])
def test_guidance_sweep_has_each_scale_once(tmp_path, scales_evaluated, w, expected):
    out = _report(tmp_path, f"sampler.guidance_scale={w}")
    assert scales_evaluated == [expected]
    assert len(_table((out / "report.md").read_text())) == 2 + len(expected)  # header, rule, one row per w


def _cells(line: str) -> int:
    """How many unescaped ``|`` a GFM table line has (a backslash escapes the next character)."""
    count, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        count += line[i] == "|"
        i += 1
    return count


def test_user_strings_cannot_break_the_metrics_table(tmp_path, scales_evaluated):
    name = "a|b\\|c\\"  # a pipe, an escaped-looking pipe, a trailing backslash
    out = _report(tmp_path, f"run.name={name}")
    table = _table((out / "report.md").read_text())
    assert len(table) == 4 and len({_cells(line) for line in table}) == 1, table
    assert table[2].startswith("| a\\|b\\\\\\|c\\\\ (label) |")
    assert "a|b\\|c\\ (label)" in (out / "index.html").read_text()  # HTML shows the name as it is


def test_an_interrupted_report_keeps_the_earlier_files_whole(tmp_path, scales_evaluated, monkeypatch):
    import sgdm.training.checkpoint as checkpoint

    out = _report(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"clusters.png", "scales.png", "report.md", "index.html"} <= set(before)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _report(tmp_path)  # other images: every file would change
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no half-written file, no temporary


def test_each_write_replaces_the_file_through_a_temporary(tmp_path, scales_evaluated, monkeypatch):
    import os

    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(os.path.basename(dst)), real(src, dst)))
    _report(tmp_path)
    assert {"clusters.png", "scales.png", "report.md", "index.html"} <= set(replaced)


def test_images_of_sections_no_longer_produced_are_removed(tmp_path, scales_evaluated):
    out = tmp_path / "run" / "report"
    out.mkdir(parents=True)
    for name in ("box-guided.png", "mask-guided.png", "notes.png"):  # companions of an earlier report; the user's own
        (out / name).write_bytes(b"old")
    _report(tmp_path)  # companions switched off
    assert not (out / "box-guided.png").exists() and not (out / "mask-guided.png").exists()
    assert (out / "notes.png").read_bytes() == b"old"  # not a file the report names: not the report's to remove
    assert (out / "clusters.png").stat().st_size > 0 and (out / "scales.png").stat().st_size > 0
    assert set(report.SECTION_IMAGES) == {"clusters.png", "scales.png", "box-guided.png", "mask-guided.png"}


def test_the_cluster_rows_say_which_labels_guide_them(tmp_path, scales_evaluated):
    # a ground-truth-label run (configs/shapes_cpu.yaml with a report) was captioned "self-labeled guidance"
    gt = _report(tmp_path / "gt", "model.guidance.source=gt", "annotation.source=gt")
    assert "Rows: clusters 0..3 (ground-truth labels)" in (gt / "report.md").read_text()
    own = _report(tmp_path / "self")
    assert "Rows: clusters 0..3 (self-labeled guidance)" in (own / "report.md").read_text()
