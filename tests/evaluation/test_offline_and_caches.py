"""The evaluation: offline Inception weights, reference-statistics caches, config errors."""
import json
import urllib.error

import pytest
import torch

from sgdm.cli.main import main
from tests.evaluation.helpers import make_run


@pytest.mark.parametrize("value", ["true", "True", "YES", "on"])
def test_offline_as_huggingface_spells_it_fails_at_once(tmp_path, monkeypatch, value):
    """HF_HUB_OFFLINE=true (huggingface_hub's own truthy spellings) is offline too: no download of
    torch-fidelity's Inception after every sample is drawn."""
    from sgdm.evaluation.fidelity import check_inception_weights

    monkeypatch.delenv("SGDM_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="offline mode is set"):
        check_inception_weights(None)


def test_offline_false_is_not_offline(tmp_path, monkeypatch):
    from sgdm.evaluation.fidelity import check_inception_weights

    monkeypatch.delenv("SGDM_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "false")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert check_inception_weights(None) == "tf-inception-2015-12-05"


def test_unreachable_inception_download_fails_before_sampling(tmp_path, monkeypatch, capsys):
    """Online mode without a local Inception: the download is tried before sampling, so a machine
    without a network learns it at once, not after hours of sampling."""
    import sgdm.evaluation.evaluate as evaluate
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    run_dir = make_run(tmp_path, "label")
    monkeypatch.delenv("SGDM_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    sampled = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: sampled.append(1) or None)
    assert main(["eval", str(run_dir), "--n", "4", "--batch-size", "4", "--steps", "2", "--metrics", "fid"]) == 1
    err = capsys.readouterr().err
    assert "--inception-weights" in err and "name resolution" in err, err
    assert "Traceback" not in err
    assert not sampled


def test_reference_statistics_are_recomputed_when_the_images_change(tmp_path):
    """The cached reference statistics belong to the images, not only to the data config: an image
    replaced in place (same path, same config) must not leave the distance measured against the old
    images' statistics."""
    import os

    import numpy as np
    from PIL import Image

    from tests.evaluation.test_evaluate import _folder_run

    run_dir = _folder_run(tmp_path, "skip")  # images/0.png ... 5.png, 1.png unreadable; fd, 4 reference images
    assert main(["eval", str(run_dir)]) == 0
    before = json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]["fd_tiny"]
    path = tmp_path / "images" / "0.png"
    stat = path.stat()
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(path)  # a white image in its place
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert main(["eval", str(run_dir)]) == 0
    after = json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]["fd_tiny"]
    assert after != pytest.approx(before, rel=1e-6)  # the same samples against other reference images
    assert len(list((run_dir / "eval" / "cache").glob("fd-tiny-*.pt"))) == 2


def test_two_evaluations_writing_one_reference_cache_at_once(tmp_path, monkeypatch):
    """Two evaluations of one run (another --seed in a second job) compute the same fd reference
    statistics at the same time: the second's write in the middle of the first's must leave both
    running and a whole cache file, not a mix of the two or a crash on a temporary file taken away."""
    import io
    import os

    import sgdm.evaluation.feature_distance as fdist

    features = {"first": torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                "second": torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    monkeypatch.setattr(fdist, "embed", lambda space, batches: features[next(iter(batches))])
    cache = tmp_path / "cache" / "fd-x.pt"
    real_save, pid = torch.save, os.getpid()
    state = {"inside": False}

    def interleaved_save(obj, f):
        if state["inside"]:
            return real_save(obj, f)
        state["inside"] = True
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115
        fh.write(data[: len(data) // 2])
        fh.flush()
        monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # the other evaluation, start to end
        fdist.reference_stats(None, ["second"], cache)
        monkeypatch.setattr(os, "getpid", lambda: pid)
        fh.write(data[len(data) // 2:])
        if fh is not f:
            fh.close()

    monkeypatch.setattr(torch, "save", interleaved_save)
    first = fdist.reference_stats(None, ["first"], cache)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temporary file left
    kept = torch.load(cache, weights_only=True)  # whole: one of the two evaluations' statistics
    assert torch.equal(kept["mu"], first.mu) or torch.equal(kept["mu"], features["second"].mean(0))


def test_bad_kid_subsets_names_kid_subsets():
    from sgdm.config.core import ConfigError, from_dict
    from sgdm.evaluation.config import EvalConfig

    with pytest.raises(ConfigError) as err:
        from_dict(EvalConfig, {"kid_subsets": 0}, "eval")
    assert err.value.key == "eval.kid_subsets", err.value
    with pytest.raises(ConfigError) as err:
        from_dict(EvalConfig, {"kid_subset_size": 1}, "eval")
    assert err.value.key == "eval.kid_subset_size", err.value


def test_inception_runs_on_eval_device(monkeypatch, inception_weights):
    """--device cpu keeps torch-fidelity's Inception off the GPU too (it took CUDA whenever present)."""
    import torch_fidelity

    from sgdm.evaluation.fidelity import UInt8Images, inception_metrics

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", lambda **kw: seen.update(kw) or {})
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    inception_metrics(images, UInt8Images(images), "x", ["fid"], inception_weights, device="cpu")
    assert seen["cuda"] is False


def test_a_recorded_weights_path_missing_here_does_not_block_the_run(tmp_path, inception_weights):
    """A run trained elsewhere records eval.inception_weights / eval.feature_weights of that machine:
    an evaluation that reads other files (a flag's, or none for its metrics) must not fail on them."""
    import yaml

    run_dir = make_run(tmp_path, "label")
    config = run_dir / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["eval"].update(inception_weights="/elsewhere/pt_inception.pth", feature_weights="/elsewhere/enc.pth")
    config.write_text(yaml.safe_dump(raw))
    assert main(["eval", str(run_dir), "--metrics", "fd", "--feature-weights", raw["annotation"]["weights"],
                 "--n", "4", "--batch-size", "4"]) == 0


def test_missing_weights_named_by_key_without_a_flag(tmp_path, capsys):
    run_dir = make_run(tmp_path, "label")
    import yaml

    config = run_dir / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["eval"]["inception_weights"] = str(tmp_path / "nope.pth")
    config.write_text(yaml.safe_dump(raw))
    assert main(["eval", str(run_dir), "--metrics", "fid", "--n", "4", "--batch-size", "4"]) == 2
    assert "eval.inception_weights: file" in capsys.readouterr().err
    from sgdm.config.core import ConfigError
    from sgdm.evaluation.evaluate import evaluate_run

    with pytest.raises(ConfigError, match="eval.inception_weights: file"):  # the run's own eval: section
        evaluate_run(run_dir)


def test_an_unusable_cache_folder_is_named_as_such(tmp_path, inception_weights):
    """An OSError of torch-fidelity's reference cache (eval.cache_dir a file, a full disk) is not a
    failed download of the Inception weights: the error names the cache folder."""
    from sgdm.evaluation.fidelity import UInt8Images, inception_metrics

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(RuntimeError) as err:
        inception_metrics(images, UInt8Images(images), "x", ["fid"], inception_weights, cache_dir=not_a_folder,
                          device="cpu")
    assert str(not_a_folder) in str(err.value) and "eval.cache_dir" in str(err.value), err.value
    assert "Inception weights" not in str(err.value)


def test_a_sweep_of_an_unguided_run_says_why_it_is_one_row(tmp_path, capsys):
    run_dir = make_run(tmp_path, "none")
    assert main(["eval", str(run_dir), "--metrics", "fd", "--sweep-scale", "0,1,2"]) == 0
    rows = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert len(rows) == 1 and rows[0]["guidance_scale"] is None
    err = capsys.readouterr().err
    assert "--sweep-scale" in err and "no guidance" in err, err



def test_reference_key_of_an_lmdb_follows_its_data_file(tmp_path):
    """LMDB items have no file of their own: the key stamps the database's data.mdb, so an LMDB rewritten
    in place under the same config does not reuse the old reference statistics."""
    import os

    from sgdm.evaluation.evaluate import _reference_content

    class Lmdb:  # what LsunLmdbDataset exposes: ids, root, source = "root[id]"
        root, ids = tmp_path, ["a", "b"]

        def __len__(self):
            return 2

        def source(self, i):
            return f"{self.root}[{self.ids[i]}]"

    data = tmp_path / "data.mdb"
    data.write_bytes(b"x" * 100)
    before = _reference_content(Lmdb(), 2)
    data.write_bytes(b"y" * 200)
    os.utime(data, ns=(0, data.stat().st_mtime_ns + 5_000_000_000))
    assert _reference_content(Lmdb(), 2) != before


def test_fid_alone_finds_a_short_reference_set_before_sampling(tmp_path, capsys, monkeypatch, inception_weights):
    """FID without fd: a reference set with fewer readable images than it needs stops the evaluation
    before any sample is drawn (fd read it early; torch-fidelity reads it only after sampling)."""
    import sgdm.evaluation.evaluate as evaluate
    from tests.evaluation.test_evaluate import _folder_run

    run_dir = _folder_run(tmp_path, "skip")  # 6 images, 1.png unreadable
    sampled = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: sampled.append(1) or None)
    assert main(["eval", str(run_dir), "--metrics", "fid", "--inception-weights", str(inception_weights),
                 "--reference-n", "6"]) == 1
    err = capsys.readouterr().err
    assert "needs 6 readable images (eval.reference_n)" in err, err
    assert not sampled


def test_fid_alone_with_cached_reference_features_reads_no_reference_image(tmp_path, monkeypatch, inception_weights):
    """The check before sampling reads the reference images only when torch-fidelity has not cached
    their features: a second evaluation reads none of them."""
    import sgdm.evaluation.evaluate as evaluate

    run_dir = make_run(tmp_path, "label")
    args = ["eval", str(run_dir), "--metrics", "fid", "--inception-weights", str(inception_weights), "--n", "4",
            "--batch-size", "4", "--steps", "2"]
    assert main(args) == 0
    first = json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]["fid"]

    def unread(self, index):
        raise AssertionError(f"reference image {index} read again")

    monkeypatch.setattr(evaluate._ReferenceImages, "__getitem__", unread)
    assert main(args) == 0
    assert json.loads((run_dir / "eval" / "results.json").read_text())["results"][0]["fid"] == pytest.approx(first)
