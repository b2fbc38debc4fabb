"""Resuming a run whose images changed under the same settings: files added, removed or replaced in place
under the same data.root, a list file edited. Refused naming data.root and what changed, before anything is
written or encoded; a copy of the same images (at the same path or another) still resumes. The latent cache
is not read through rows of replaced images (CPU, tiny model)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from sgdm.config.core import ConfigError, from_dict
from sgdm.config.schema import ExperimentConfig
from tests.training.test_resume_moved_paths import _folder_config, _images, _resume, _started


def _replace(path, seed: int = 0) -> None:
    """Another picture under the same name: noise, so its PNG has another size than the flat colour's (and
    than the noise of another seed: another side)."""
    from PIL import Image

    side = 32 + seed
    pixels = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy(), "RGB").save(path)


def _refused(cfg: dict) -> str:
    with pytest.raises(ConfigError) as err:
        _resume(cfg)
    assert err.value.key == "data.root"
    return str(err.value)


@pytest.mark.parametrize("change, said", [
    (lambda root: [_replace(root / f"img_{i}.png", i) for i in (7, 6)],
     "2 added (img_6.png, img_7.png)"),
    (lambda root: (root / "img_2.png").unlink(), "1 removed (img_2.png)"),
    (lambda root: _replace(root / "img_3.png"), "1 replaced (another file size: img_3.png)"),
    (lambda root: ((root / "img_1.png").unlink(), (root / "img_4.png").unlink(), _replace(root / "img_0.png"),
                   _replace(root / "new.png")), "1 added (new.png), 2 removed (img_1.png, img_4.png), 1 replaced "
                                                "(another file size: img_0.png)"),
])
def test_a_resume_on_the_same_root_whose_images_changed_is_refused_naming_them(tmp_path, change, said):
    """Before: accepted without a word, and dataset.json overwritten with the new images' ids: the run went on
    over another data order (positions past the checkpoint index other images), with the old latent cache
    rows (replaced images) and labels annotated from the old pixels."""
    root = _images(tmp_path / "data")
    run = _started(_folder_config(tmp_path, root))
    recorded = (run.run.path / "dataset.json").read_text()
    change(root)
    text = _refused(_folder_config(tmp_path, root))
    assert f"{root} holds other images than this run started with ({run.run.path / 'dataset.json'}): {said}" in text
    assert "Put those images back, or start a new run.name" in text
    assert (run.run.path / "dataset.json").read_text() == recorded  # the record still says what the run trained on


def test_a_resume_with_an_edited_list_file_is_refused_naming_the_lines_that_changed(tmp_path):
    """data.list_file at the same path, its lines edited; or the same lines in another order (another data
    order: the same positions index other images)."""
    root = _images(tmp_path / "data")
    listing = tmp_path / "train.txt"
    listing.write_text("img_0.png\nimg_1.png\nimg_2.png\nimg_3.png\n")
    cfg = _folder_config(tmp_path, root)
    cfg["data"]["list_file"] = str(listing)
    _started(cfg)
    listing.write_text("img_1.png\nimg_0.png\nimg_2.png\nimg_3.png\n")
    text = _refused(cfg)
    assert f"{root} (data.list_file {listing}) holds other images" in text and ": the same images in another " \
                                                                              "order (first at index 0: img_1.png)" in text
    listing.write_text("img_0.png\nimg_2.png\nimg_3.png\nimg_5.png\n")
    assert "1 added (img_5.png), 1 removed (img_1.png)" in _refused(cfg)
    listing.write_text("img_0.png\nimg_1.png\nimg_2.png\nimg_3.png\n")
    moved = tmp_path / "elsewhere" / "train.txt"  # the same lines elsewhere: a moved list file, accepted
    moved.parent.mkdir()
    shutil.copy(listing, moved)
    cfg["data"]["list_file"] = str(moved)
    assert _resume(cfg) is not None


def test_a_copy_of_the_same_images_resumes_at_the_same_path_and_at_another(tmp_path, capsys):
    """Node-local scratch filled anew by each job (`cp -r`, which leaves no modification time as it was): the
    same ids and file sizes, so the same images; a moved copy of them too. Nothing is said at the same path."""
    root, backup = tmp_path / "scratch" / "data", tmp_path / "store" / "data"
    _images(backup)
    shutil.copytree(backup, root, copy_function=shutil.copy)  # copy: new modification times
    run = _started(_folder_config(tmp_path, root))
    shutil.rmtree(root)
    shutil.copytree(backup, root, copy_function=shutil.copy)
    capsys.readouterr()
    assert _resume(_folder_config(tmp_path, root)) is not None
    assert capsys.readouterr().err == ""
    assert _resume(_folder_config(tmp_path, backup)) is not None  # moved: accepted, saying so
    assert f"data.root moved ({root} -> {backup}): accepted" in capsys.readouterr().err
    assert json.loads((run.run.path / "dataset.json").read_text())["root"] == str(backup)


def test_a_moved_root_whose_copy_has_an_image_replaced_is_refused_naming_it(tmp_path, capsys):
    """Before: the moved root was compared by its ids only, and accepted."""
    first, copy = tmp_path / "a", tmp_path / "b"
    _images(first)
    run = _started(_folder_config(tmp_path, first))
    shutil.copytree(first, copy)
    _replace(copy / "img_5.png")
    capsys.readouterr()
    with pytest.raises(ConfigError) as err:
        _resume(_folder_config(tmp_path, copy))
    assert err.value.key == "data.root" and f"({str(first)!r} -> {str(copy)!r})" in str(err.value)
    assert f"{copy} holds other images (the dataset's ids, in order, and their file sizes) than recorded in " \
           f"{run.run.path / 'dataset.json'}: 1 replaced (another file size: img_5.png)" in str(err.value)
    assert "accepted" not in capsys.readouterr().err


def test_a_run_recorded_without_file_sizes_compares_its_ids_and_records_them(tmp_path):
    """dataset.json of an earlier sgdm holds the ids' digest only: a resume at the same root compares it, and
    records the sizes (and the listing that names changes) for the next resume."""
    root = _images(tmp_path / "data")
    run = _started(_folder_config(tmp_path, root))
    record = run.run.path / "dataset.json"
    older = {k: v for k, v in json.loads(record.read_text()).items() if k in ("root", "num_images", "ids_sha256")}
    record.write_text(json.dumps(older))
    (run.run.path / "dataset_files.json.gz").unlink()
    (root / "img_5.png").unlink()
    assert "num_images 5 (recorded 6)" in _refused(_folder_config(tmp_path, root))
    _replace(root / "img_5.png")  # back (another picture: nothing recorded could tell)
    assert _resume(_folder_config(tmp_path, root)) is not None
    assert "files_sha256" in json.loads(record.read_text())
    _replace(root / "img_5.png", seed=1)
    assert "1 replaced (another file size: img_5.png)" in _refused(_folder_config(tmp_path, root))


def test_training_resumed_on_replaced_images_stops_before_the_latent_cache_is_touched(tmp_path):
    """End to end through `train`: the refusal comes before the latent cache is checked or rebuilt."""
    from tests.training.helpers import run_in_process

    root = _images(tmp_path / "data")
    cfg = _folder_config(tmp_path, root, train={"max_steps": 1, "checkpoint_every": 1, "cache_latents": True})
    assert run_in_process(cfg) == 0
    cache = tmp_path / "runs" / "tiny" / "latents"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    _replace(root / "img_2.png")
    cfg["train"]["max_steps"] = 2
    with pytest.raises(ConfigError, match=r"data\.root: .*1 replaced \(another file size: img_2\.png\)"):
        run_in_process(cfg, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


@pytest.mark.parametrize("shared", [False, True])
def test_the_latent_cache_of_an_image_replaced_in_place_is_not_read(tmp_path, shared):
    """Same ids, same settings, same first stage, one file rewritten with another picture: before, the cache
    was complete and kept, and training read the old picture's latents for it. The run's own cache is
    encoded again; a shared train.cache_dir is refused, as for other images."""
    from sgdm.training.latent_cache import LatentCacheDataset, ensure_latent_cache
    from sgdm.training.run import build_first_stage

    root = _images(tmp_path / "data")
    train = {"cache_latents": True, "cache_shard_size": 4, **({"cache_dir": str(tmp_path / "shared")} if shared else {})}
    cfg = from_dict(ExperimentConfig, _folder_config(tmp_path, root, train=train))
    first_stage = build_first_stage(cfg)
    before = LatentCacheDataset(ensure_latent_cache(cfg, first_stage))[3]["mean"]
    _replace(root / "img_3.png")
    if shared:
        with pytest.raises(ConfigError, match=r"train\.cache_dir: .*other images"):
            ensure_latent_cache(cfg, first_stage)
        return
    after = LatentCacheDataset(ensure_latent_cache(cfg, first_stage))
    assert not torch.equal(after[3]["mean"], before)
    from sgdm.training.data import build_image_dataset

    image = build_image_dataset(cfg.data, cfg.run.seed)[3]["image"]
    with torch.no_grad():
        torch.testing.assert_close(after[3]["mean"], first_stage.eval().encode(image[None]).mean[0])
