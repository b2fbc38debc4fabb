"""Records of the data settings stay valid with ``data.exif_orientation``: an older record (which lacks the key)
fits ``ignore`` and is refused under ``apply``, naming the key (stores, feature caches, encoders, latent
caches, resume)."""
import dataclasses

import pytest
import torch
import yaml

from sgdm.annotation.annotate import data_settings
from sgdm.config.core import ConfigError, dump_yaml, from_dict, to_dict
from sgdm.data import DataConfig
from sgdm.data.config import ADDED_KEYS, recorded_data
from tests.data.test_exif_orientation import tagged_jpeg, write


def _before_the_key():
    """DataConfig as it was before ``exif_orientation`` (and the other keys added since records were
    written) existed: what older records were written from."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
              for f in dataclasses.fields(DataConfig) if f.name not in ADDED_KEYS]
    return dataclasses.make_dataclass("OldDataConfig", fields)


@pytest.fixture
def photos(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write(tmp_path / "photos" / name, tagged_jpeg(6))
    section = {"dataset": "image_folder", "root": str(tmp_path / "photos"), "size": 8, "num_workers": 0}
    ignore = from_dict(DataConfig, section, "data")
    apply = from_dict(DataConfig, {**section, "exif_orientation": "apply"}, "data")
    old = _before_the_key()(**{k: v for k, v in vars(ignore).items() if k not in ADDED_KEYS})
    return ignore, apply, old


def test_the_key_is_recorded_only_away_from_its_old_value(photos):
    ignore, apply, old = photos
    assert recorded_data(ignore) == to_dict(old) and "exif_orientation" not in data_settings(ignore)
    assert recorded_data(apply) == {**to_dict(old), "exif_orientation": "apply"}
    assert data_settings(apply)["data.exif_orientation"] == "apply"


def test_a_feature_cache_of_an_older_sgdm_fits_ignore_and_is_refused_under_apply(photos, tmp_path):
    from sgdm.annotation.cache import FeatureCache
    from sgdm.annotation.store import StoreMismatchError

    ignore, apply, _ = photos
    old = {k: v for k, v in data_settings(apply).items() if k != "data.exif_orientation"}  # as an older sgdm wrote
    FeatureCache(tmp_path / "work", {**old, "backbone": "vit"})
    FeatureCache(tmp_path / "work", {**data_settings(ignore), "backbone": "vit"})
    with pytest.raises(StoreMismatchError, match=r"data\.exif_orientation differ; they were "
                                                 r"data\.exif_orientation=ignore\)") as info:
        FeatureCache(tmp_path / "work", {**data_settings(apply), "backbone": "vit"})
    assert "did not record" not in str(info.value)  # left out at ignore, not unknown to the sgdm that wrote it


def test_an_encoder_pretrained_before_the_key_fits_ignore_and_is_refused_under_apply(photos, tmp_path):
    from sgdm.features_pretrain.config import PretrainConfig
    from sgdm.features_pretrain.train import pretrain_record_differs, save_backbone

    ignore, apply, _ = photos
    made = PretrainConfig()
    old = {k: v for k, v in data_settings(apply).items() if k != "data.exif_orientation"}
    path = save_backbone(torch.nn.Linear(2, 2), tmp_path / "enc.safetensors", "vit", {}, pretrain=made, data=old)
    assert pretrain_record_differs(path, "vit", {}, made, data_settings(ignore)) == []
    assert pretrain_record_differs(path, "vit", {}, made, data_settings(apply)) == ["data.exif_orientation"]


def test_a_latent_cache_fingerprint_is_unchanged_under_ignore(photos):
    from sgdm.training.latent_cache import fingerprint

    ignore, apply, old = photos
    stage = torch.nn.Linear(2, 2)
    assert fingerprint(ignore, stage) == fingerprint(old, stage) != fingerprint(apply, stage)


@pytest.mark.parametrize("granularity, refused", [("box", True), ("mask", True), ("label", False)])
def test_a_box_or_mask_store_annotated_before_the_key_is_refused_under_apply(photos, tmp_path, granularity, refused):
    from sgdm.annotation.store import AnnotationStore, ids_hash, write_store
    from sgdm.config.schema import check_store_dataset

    ignore, apply, old = photos
    ids = ["a.jpg", "b.jpg"]
    records = {"label": {"cluster": torch.tensor([0, 1])},
               "box": {"cluster": torch.tensor([0, 1]), "box": torch.tensor([[0.1, 0.1, 0.5, 0.5]] * 2)},
               "mask": {"mask": torch.zeros(2, 4, 4, dtype=torch.uint8)}}[granularity]
    write_store(tmp_path / "store", ids, records, granularity=granularity, num_classes=2,
                extra={"dataset": {"config": to_dict(old), "ids_sha256": ids_hash(ids)}})
    opened = AnnotationStore.open(tmp_path / "store")
    check_store_dataset(opened, ignore)
    if not refused:  # a class is the image's, whichever way up
        check_store_dataset(opened, apply)
        return
    with pytest.raises(ConfigError) as info:
        check_store_dataset(opened, apply)
    assert info.value.key == "data.exif_orientation"
    assert f"annotated from images read with 'ignore': its {granularity} annotations" in info.value.message
    write_store(tmp_path / "new", ids, records, granularity=granularity, num_classes=2,  # and the other way round
                extra={"dataset": {"config": to_dict(apply), "ids_sha256": ids_hash(ids)}})
    check_store_dataset(AnnotationStore.open(tmp_path / "new"), apply)
    with pytest.raises(ConfigError, match="read with 'apply'"):
        check_store_dataset(AnnotationStore.open(tmp_path / "new"), ignore)


def test_resume_of_a_run_saved_before_the_key_refuses_apply(tmp_path):
    from sgdm.config.schema import ExperimentConfig, recorded_config
    from sgdm.training.resume import check_resume_compatible, resume_differences
    from tests.training.helpers import tiny_config

    def config(orientation):
        data = {"dataset": "image_folder", "root": str(tmp_path / "photos"), "exif_orientation": orientation}
        return from_dict(ExperimentConfig, tiny_config(tmp_path, data=data))

    saved = tmp_path / "config.yaml"
    old = yaml.safe_load(dump_yaml(recorded_config(config("ignore"))))
    del old["data"]["exif_orientation"]  # as an older sgdm wrote it
    saved.write_text(dump_yaml(old))
    check_resume_compatible(config("ignore"), saved)
    with pytest.raises(ConfigError) as info:
        check_resume_compatible(config("apply"), saved)
    assert info.value.key == "data.exif_orientation" and "'ignore' -> 'apply'" in info.value.message
    saved.write_text(dump_yaml(recorded_config(config("apply"))))  # a run saved with apply: ignore is refused
    with pytest.raises(ConfigError, match="'apply' -> 'ignore'"):
        check_resume_compatible(config("ignore"), saved)
    assert resume_differences({"data": {}}, {"data": {"exif_orientation": "apply"}}) == [
        ("data.exif_orientation", "ignore", "apply")]
