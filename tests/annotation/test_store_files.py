"""An annotation store records the file sizes of the images it annotated; training and evaluation refuse
it once an image was replaced under the same name (its labels are of the old pixels)."""
from __future__ import annotations

import shutil

import pytest

from sgdm.annotation.annotate import annotate
from sgdm.annotation.store import AnnotationStore
from sgdm.config.core import ConfigError, from_dict, to_dict
from sgdm.config.schema import ExperimentConfig, check_annotation_store
from tests.data import fixtures
from tests.training.helpers import tiny_config

from .conftest import image_folder
from .test_annotate import folder_config


def _experiment(tmp_path, annotated, root):
    """A label-guided run on the image folder ``root`` with the store ``annotated`` (annotate's config) made."""
    data = {**to_dict(annotated.data), "root": str(root)}
    return from_dict(ExperimentConfig, tiny_config(tmp_path, data=data, annotation=to_dict(annotated.annotation),
                                                   model={"guidance": {"kind": "label", "num_classes": 2}}))


@pytest.fixture
def annotated(tmp_path, tiny_weights):
    root = image_folder(tmp_path / "imgs", good=5, bad=True)  # img_bad.png cannot be read: not in the store
    cfg = folder_config(tmp_path, tiny_weights, root)
    store = AnnotationStore.open(annotate(cfg, "label", progress=False, log=lambda m: None).store)
    assert len(store) == 5 and "img_bad.png" not in store
    return root, cfg


def test_the_store_records_the_sizes_of_the_images_it_holds(annotated):
    from sgdm.data import build_dataset
    from sgdm.data.files import files_hash, item_sizes

    root, cfg = annotated
    store = AnnotationStore.open(cfg.annotation.store)
    dataset = build_dataset(cfg.data, train=False)
    sizes = dict(zip(dataset.ids, item_sizes(dataset)))
    assert store.manifest["files_sha256"] == files_hash(store.ids, [sizes[i] for i in store.ids])
    assert [tuple(s) for s in store.manifest["file_sizes"]] == [sizes[i] for i in store.ids]


def test_an_image_replaced_since_annotation_is_refused(tmp_path, annotated):
    root, cfg = annotated
    run = _experiment(tmp_path, cfg, root)
    check_annotation_store(run)  # unchanged: accepted
    other = fixtures.encode(fixtures.sample_rgb(48, 40, seed=99), "PNG")
    assert len(other) != (root / "img_03.png").stat().st_size
    (root / "img_03.png").write_bytes(other)
    with pytest.raises(ConfigError) as err:
        check_annotation_store(run)
    message = str(err.value)
    assert "\n" not in message and message.startswith("annotation.store")
    assert f"data.root {root}" in message and "1 of its 5 images replaced" in message and "img_03.png" in message
    assert "sgdm-ldm annotate" in message


def test_the_unreadable_image_replaced_is_not_compared_with_the_store(tmp_path, annotated):
    root, cfg = annotated  # it is not in the store: training skips it as it did (data.on_bad_image)
    (root / "img_bad.png").write_bytes(b"still not a PNG")
    check_annotation_store(_experiment(tmp_path, cfg, root))


def test_a_copy_of_the_dataset_elsewhere_is_accepted(tmp_path, annotated):
    root, cfg = annotated
    copy = shutil.copytree(root, tmp_path / "copy")  # new times, the same sizes (a node-local scratch copy)
    check_annotation_store(_experiment(tmp_path, cfg, copy))


def test_a_store_without_the_record_is_compared_by_ids(tmp_path, annotated):
    import json

    root, cfg = annotated
    manifest_path = cfg.annotation.store / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files_sha256"], manifest["file_sizes"]  # as an older sgdm wrote it
    manifest_path.write_text(json.dumps(manifest))
    (root / "img_03.png").write_bytes(fixtures.encode(fixtures.sample_rgb(48, 40, seed=99), "PNG"))
    check_annotation_store(_experiment(tmp_path, cfg, root))


def test_a_dataset_without_files_is_compared_by_ids(tmp_path):
    from tests.training.helpers import make_label_store

    cfg = tiny_config(tmp_path)  # shapes: generated images, no files of their own
    make_label_store(cfg)
    assert "files_sha256" not in AnnotationStore.open(cfg["annotation"]["store"]).manifest
    check_annotation_store(from_dict(ExperimentConfig, cfg))


def _write(tmp_path, run) -> str:
    from sgdm.config.core import dump_yaml

    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(run))
    return str(path)


def test_training_refuses_a_stale_store_before_any_work(tmp_path, annotated, capsys):
    from sgdm.cli.main import main

    root, cfg = annotated
    run = _experiment(tmp_path, cfg, root)
    (root / "img_01.png").write_bytes(fixtures.encode(fixtures.sample_rgb(48, 40, seed=99), "PNG"))
    code = main(["train", _write(tmp_path, run)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "img_01.png" in err and "is stale" in err, err
    assert not run.run.path.exists()


def test_training_takes_the_file_sizes_once(tmp_path, annotated, monkeypatch):
    """The store's check and the run's record (dataset.json) read one snapshot of the same dataset object."""
    import sgdm.data.files
    import sgdm.training.run
    from sgdm.cli.main import main
    from sgdm.training.dataset_record import record

    root, cfg = annotated
    stats, recorded = [], []
    size = sgdm.data.files._size
    monkeypatch.setattr(sgdm.data.files, "_size", lambda path: stats.append(path) or size(path))

    def train(cfg, resume=False, callbacks=(), dataset=None):  # what training records first, from its dataset
        from sgdm.training.data import build_image_dataset

        images = build_image_dataset(cfg.data, cfg.run.seed) if dataset is None else dataset
        recorded.append(record(images, cfg.data.root))
        return 0

    monkeypatch.setattr(sgdm.training.run, "train", train)
    assert main(["train", _write(tmp_path, _experiment(tmp_path, cfg, root))]) == 0
    assert recorded[0]["files_sha256"] and sorted(stats) == sorted(str(p) for p in root.iterdir())


def test_evaluation_refuses_a_stale_store(tmp_path, annotated):
    from sgdm.evaluation.store_checks import check_store

    root, cfg = annotated
    run = _experiment(tmp_path, cfg, root)
    check_store(run, ["fd"], tmp_path / "no-run")
    (root / "img_00.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is stale: 1 of its 5 images .*img_00\.png"):
        check_store(run, ["fd"], tmp_path / "no-run")
