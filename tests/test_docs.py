"""The documentation as a new user reads it: README.md and docs/*.md.

Their Python snippets run as written on a tiny model, their command lines name subcommands and
flags that exist, their dotted config keys exist in the schema, their links resolve, and the
README's Layout names every package under sgdm/.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import typing

import numpy as np
import pytest
from PIL import Image

from sgdm.cli.main import SUBCOMMANDS, build_parser
from sgdm.config.schema import ExperimentConfig
from sgdm.pipeline import SelfGuidedPipeline
from tests.pipeline.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/data.md", "docs/training.md"]


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _indented_python(text: str) -> list[str]:
    """Indented (4-space) blocks that hold Python: they start with an import or an assignment."""
    blocks, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("    ") or (block and not line.strip()):
            block.append(line[4:])
            continue
        if block:
            blocks.append("\n".join(block).strip() + "\n")
            block = []
    return [b for b in blocks if re.match(r"(import |from |\w+ = )", b)]


def _save_tiny(path: pathlib.Path, kind: str, num_classes: int) -> None:
    cfg = tiny_config(kind)
    cfg["model"]["guidance"]["num_classes"] = num_classes  # the snippets guide with cluster 3
    SelfGuidedPipeline.from_config(cfg).save_pretrained(path / "pipeline")


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    (snippet,) = [s for s in _fenced(_text("README.md"), "python") if "from_pretrained" in s]
    _save_tiny(tmp_path / "runs" / "quickstart", "label", 4)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    images = scope["images"]
    assert len(images) == 8 and all(isinstance(im, Image.Image) for im in images)


def test_training_md_box_and_mask_snippet_runs_as_written(tmp_path, monkeypatch):
    (snippet,) = [s for s in _indented_python(_text("docs/training.md")) if "from_pretrained" in s]
    _save_tiny(tmp_path / "runs" / "boxed", "box", 4)
    _save_tiny(tmp_path / "runs" / "masked", "mask", 4)
    side = tiny_config()["model"]["autoencoder"]["resolution"]
    ids = np.zeros((side, side), np.uint8)
    ids[side // 2:] = 3
    ids[:4, :4] = 255  # no guidance there
    Image.fromarray(ids, "L").save(tmp_path / "map.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}  # no imports given: the snippet must carry its own
    exec(compile(snippet, "docs/training.md", "exec"), scope)
    assert len(scope["images"]) == 4


def _commands(text: str) -> list[list[str]]:
    """Every `sgdm-ldm SUBCOMMAND ...` invocation in the text (code spans, tables, code blocks)."""
    text = text.replace("\\\n", " ").replace("\\|", "|")
    found = []
    for m in re.finditer(r"sgdm-ldm ([a-z-]+)((?: [^`\n#]*)?)", text):
        found.append([m.group(1)] + m.group(2).split())
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_use_existing_subcommands_and_flags(doc):
    parser = build_parser()
    subparsers = parser.subcommand_parsers
    for command in _commands(_text(doc)):
        name, args = command[0], command[1:]
        if name not in SUBCOMMANDS:
            continue  # prose such as "sgdm-ldm info prints ..." is checked by the table test
        options = set(subparsers[name]._option_string_actions)
        for arg in args:
            flag = re.match(r"\[?(--?[a-zA-Z][\w-]*)", arg)
            if flag and flag.group(1) not in options:
                raise AssertionError(f"{doc}: `sgdm-ldm {' '.join(command)}`: {flag.group(1)} is no option of {name}")


def test_readme_command_table_lists_every_subcommand():
    table = [line for line in _text("README.md").splitlines() if line.startswith("| `sgdm-ldm ")]
    listed = {re.match(r"\| `sgdm-ldm ([a-z-]+)", line).group(1) for line in table}
    assert listed == set(SUBCOMMANDS)


_NOT_KEYS = {"data.key", "data.mdb", "data.py"}  # placeholders and file names that look like keys


def _resolve(path: str) -> str | None:
    """None when the dotted path names a config field (or lies inside a free-form mapping)."""
    cls: typing.Any = ExperimentConfig
    for part in path.split("."):
        if not dataclasses.is_dataclass(cls):
            return None  # a dict such as backbone_kwargs: any key
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            return f"{cls.__name__} has no field {part!r}"
        hint = typing.get_type_hints(cls)[part]
        cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
    return None


@pytest.mark.parametrize("doc", DOCS)
def test_documented_config_keys_exist(doc):
    sections = "|".join(f.name for f in dataclasses.fields(ExperimentConfig))
    keys = set(re.findall(rf"(?<![\w/.])((?:{sections})(?:\.[a-z_0-9]+)+)(?![\w*])", _text(doc)))
    wrong = {k: _resolve(k) for k in keys - _NOT_KEYS if _resolve(k)}
    assert not wrong, f"{doc}: {wrong}"


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", _text(doc)):
        if "://" not in target:
            assert (ROOT / doc).parent.joinpath(target).exists(), f"{doc}: link {target}"


def test_readme_layout_names_every_package():
    (layout,) = re.findall(r"## Layout\n\n```\n(.*?)```", _text("README.md"), flags=re.S)
    packages = sorted(p.parent.name for p in (ROOT / "sgdm").glob("*/__init__.py"))
    missing = [p for p in packages if f"sgdm/{p}/" not in layout]
    assert not missing, f"README Layout does not name sgdm/{missing}"
