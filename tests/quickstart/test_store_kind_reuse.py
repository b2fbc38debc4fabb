"""prepare reuses an annotation store only of the granularity and source the run needs: a label store at
the path of a box config was reported as reused, and training then refused it."""
import dataclasses
import json

import pytest

from sgdm.annotation.store import StoreMismatchError
from sgdm.config.core import from_dict, to_dict
from sgdm.config.schema import ExperimentConfig
from sgdm.quickstart.stages import reusable_store
from tests.training.helpers import make_label_store, tiny_config


@pytest.mark.parametrize("change", [{"granularity": "box"}, {"source": "gt"}])
def test_a_store_of_another_kind_is_refused_naming_both(tmp_path, change):
    cfg_dict = tiny_config(tmp_path)
    make_label_store(cfg_dict)
    cfg = from_dict(ExperimentConfig, cfg_dict)
    manifest = cfg.annotation.store / "manifest.json"
    record = json.loads(manifest.read_text())
    record["params"] = to_dict(cfg.annotation)  # as annotate records them
    manifest.write_text(json.dumps(record))
    assert reusable_store(cfg.annotation, cfg.data)
    other = dataclasses.replace(cfg.annotation, **change)
    with pytest.raises(StoreMismatchError, match=r"holds self label annotations, not the (self box|gt label) ones"):
        reusable_store(other, cfg.data)
