"""``sgdm-ldm annotate`` and ``sgdm-ldm clusters`` through the dispatcher."""
import json
import pathlib

import pytest
import yaml

from sgdm.cli.main import main

from .conftest import TINY_KWARGS, TINY_VIT, image_folder


def write_config(path, store, weights, cache, **annotation):
    settings = {
        "data": {"dataset": "shapes", "size": 32, "num_workers": 0,
                 "shapes": {"num_images": 32, "num_val_images": 8, "image_size": 32, "cache_dir": str(cache)}},
        "annotation": {"store": str(store), "granularity": "box", "backbone": TINY_VIT, "backbone_kwargs": TINY_KWARGS,
                       "weights": str(weights), "num_classes": 4, "batch_size": 16, "shard_size": 16,
                       "lost": {"num_clusters": 4, "k_patches": 6}, **annotation},
        # the same YAML trains the model: its guidance must agree with the annotations
        "model": {"autoencoder": {"resolution": 32},
                  "unet": {"image_size": 4, "channel_mult": [1, 2], "attention_resolutions": [2]},
                  "guidance": {"kind": "box", "num_classes": 4, "source": "self"}},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def test_annotate_then_gallery(tmp_path, tiny_weights, shapes_cache, capsys):
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "store", tiny_weights, shapes_cache)
    assert main(["annotate", str(cfg), "--evaluate", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"nmi", "ari", "purity", "corloc"}
    out = tmp_path / "gallery.html"
    assert main(["clusters", str(tmp_path / "store"), "--out", str(out), "--per-cluster", "3"]) == 0
    page = out.read_text()
    assert page.count("<img") <= 4 * 3 and page.count("<img") >= 3
    assert "cluster " in page and "lost+kmeans" in page


def test_config_errors_name_the_key(tmp_path, tiny_weights, shapes_cache, capsys):
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "store", tiny_weights, shapes_cache, kmeans={"max_iters": 3})
    assert main(["annotate", str(cfg), "--no-progress"]) == 2
    assert "annotation.kmeans.max_iters: unknown key" in capsys.readouterr().err
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "store", tiny_weights, shapes_cache)
    assert main(["annotate", str(cfg), "annotation.weights=" + str(tmp_path / "nope.pth"), "--no-progress"]) == 1
    err = capsys.readouterr().err  # and how to make one, for a new user who has only images
    assert "nope.pth does not exist (annotation.weights); `sgdm-ldm pretrain-features CONFIG` trains one" in err


def test_clusters_on_missing_store(tmp_path, capsys):
    assert main(["clusters", str(tmp_path / "none"), "--out", str(tmp_path / "g.html")]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_clusters_flags_must_be_positive(tmp_path, capsys):
    for flag in ("--per-cluster", "--max-clusters", "--thumb"):
        for value in ("0", "-1"):
            assert main(["clusters", str(tmp_path / "none"), flag, value]) == 2
            assert f"config error: {flag}: must be >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
def test_annotate_stops_on_a_bad_image_with_one_line(tmp_path, tiny_weights, shapes_cache, capsys, workers):
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "store", tiny_weights, shapes_cache)
    root = image_folder(tmp_path / "imgs")
    overrides = ["data.dataset=image_folder", f"data.root={root}", "data.on_bad_image=raise",
                 f"annotation.num_workers={workers}"]
    assert main(["annotate", str(cfg), *overrides, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err
    assert err.startswith("sgdm-ldm annotate: error: image_folder index 5: ")
    assert f"{root / 'img_bad.png'}: cannot decode" in err


def test_backbone_kwargs_without_spaces_are_refused(tmp_path, tiny_weights, shapes_cache, capsys):
    """``{img_size:32}`` is YAML for the key "img_size:32" with no value: refused, not a full-size ViT."""
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "store", tiny_weights, shapes_cache)
    assert main(["annotate", str(cfg), "annotation.backbone_kwargs={img_size:32,patch_size:8}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "annotation.backbone_kwargs.img_size:32: the key 'img_size:32' holds a colon" in err
    assert "{img_size: 32, patch_size: 8}" in err
    assert not (tmp_path / "store").exists()


def test_relative_paths_are_recorded_absolute_and_clusters_runs_from_anywhere(tmp_path, tiny_weights, monkeypatch,
                                                                               capsys):
    """Annotated from one directory with relative paths; the gallery is drawn from another, then after the
    images moved (the manifest's data.root is named, and a data.root override reads them where they are)."""
    work = tmp_path / "work"
    image_folder(work / "imgs", good=6, bad=False)
    cfg = write_config(work / "exp.yaml", "store", tiny_weights, tmp_path, granularity="label", num_classes=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"] = {"dataset": "image_folder", "root": "imgs", "size": 32, "num_workers": 0}
    raw["model"]["guidance"] = {"kind": "label", "num_classes": 2, "source": "self"}
    cfg.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(work)
    assert main(["annotate", "exp.yaml", "--no-progress"]) == 0
    manifest = json.loads((work / "store" / "manifest.json").read_text())
    assert manifest["dataset"]["config"]["root"] == str(work / "imgs")
    monkeypatch.chdir(tmp_path)
    assert main(["clusters", "work/store", "--out", "g1.html"]) == 0
    (work / "imgs").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["clusters", "work/store", "--out", "g2.html"]) == 2
    err = capsys.readouterr().err
    assert f"data.root as recorded in the store's manifest {pathlib.Path('work/store/manifest.json')}: " in err
    assert "work/store data.root=DIR" in err
    assert main(["clusters", "work/store", "--out", "g3.html", "data.root=moved"]) == 0
    assert (tmp_path / "g3.html").is_file()
    # --config takes overrides too; only data.* keys are read
    assert main(["clusters", "work/store", "--config", str(cfg), "data.root=moved", "--out", "g4.html"]) == 0
    assert main(["clusters", "work/store", "train.lr=1"]) == 2
    assert "train.lr: clusters reads only the data: section" in capsys.readouterr().err


def test_clusters_of_other_images_or_an_unwritable_out_is_one_line(tmp_path, tiny_weights, capsys):
    """A dataset without the store's images (data.root of another folder, or --config of other data) ended
    in the gallery's traceback; --out under a file failed only once every thumbnail was drawn."""
    image_folder(tmp_path / "imgs", good=6, bad=False)
    image_folder(tmp_path / "fewer", good=3, bad=False)
    cfg = write_config(tmp_path / "exp.yaml", tmp_path / "store", tiny_weights, tmp_path, granularity="label",
                       num_classes=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"] = {"dataset": "image_folder", "root": str(tmp_path / "imgs"), "size": 32, "num_workers": 0}
    raw["model"]["guidance"] = {"kind": "label", "num_classes": 2, "source": "self"}
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["annotate", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    store = str(tmp_path / "store")
    assert main(["clusters", store, f"data.root={tmp_path / 'fewer'}", "--out", str(tmp_path / "g.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "3 of the 6 images of store" in err and "the dataset its manifest records" in err and "'img_03.png'" in err
    assert main(["clusters", store, "--config", str(cfg), f"data.root={tmp_path / 'fewer'}",
                 "--out", str(tmp_path / "g.html")]) == 1
    assert f"--config {cfg}" in capsys.readouterr().err
    assert not (tmp_path / "g.html").exists()
    (tmp_path / "file").write_text("")
    assert main(["clusters", store, "--out", str(tmp_path / "file" / "g.html")]) == 2
    assert f"config error: --out: cannot write {tmp_path / 'file' / 'g.html'}: {tmp_path / 'file'} is a file" in \
        capsys.readouterr().err
