"""Exact resume, SIGKILL at random points, SIGTERM -> checkpoint + exit 143 (CPU, tiny model)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import warnings

import pytest
import pytorch_lightning as pl
import torch

from sgdm.training.checkpoint import checkpoint_name, list_checkpoints
from tests.training.helpers import (assert_same_training_state, cli_command, label_workdir,
                                    make_label_store, run_checkpoint, run_in_process, tiny_config, write_config)

# One intra-op thread here and in the children: a parallel reduction's chunking depends on how many
# threads actually run, which a loaded machine can vary; bit-identity needs the same float order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield from label_workdir(tmp_path_factory, "resume")


_ckpt = run_checkpoint


class DataRecorder(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append((int(batch["position"][0]), list(batch["id"]), batch["flipped"].tolist()))


def _cli(workdir, cfg: dict, name: str, *args: str) -> None:
    proc = subprocess.run(cli_command(write_config(workdir, cfg, f"{name}.yaml"), *args), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


STEPS = 24
# accumulate 2: 2 images per micro-batch, 12 micro-batches per data epoch = 6 steps per epoch
FAULT_TRAIN = {"max_steps": STEPS, "accumulate": 2, "checkpoint_every": 2, "keep_checkpoints": 3}


@pytest.fixture(scope="module")
def reference(workdir):
    """The uninterrupted run, in a fresh process (runs compared bit for bit all start as fresh processes)."""
    cfg = tiny_config(workdir, run={"name": "reference"}, train=FAULT_TRAIN)
    _cli(workdir, cfg, "reference")
    return _ckpt(cfg, STEPS)


@pytest.mark.parametrize("start, again", [((), "--resume"), (("--auto-resume",), "--auto-resume")],
                         ids=["resume", "auto-resume"])
def test_resume_is_exact_in_a_new_process(workdir, reference, start, again):
    # --auto-resume: the same command starts the run, then continues it (a job a scheduler requeues)
    name = f"split{again}"
    split = tiny_config(workdir, run={"name": name}, train={**FAULT_TRAIN, "max_steps": 4})
    _cli(workdir, split, name, *start)
    split["train"]["max_steps"] = STEPS
    _cli(workdir, split, name, again)
    assert_same_training_state(reference, _ckpt(split, STEPS))
    assert reference["sgdm"]["ema_updates"] == STEPS


def test_resume_is_exact_with_unet_dropout(workdir):
    """model.unet.dropout draws from the global RNG; it is seeded per position and rank, so a resumed
    run drops the same units (before, the resumed half drew from a freshly seeded process)."""
    common = {"max_steps": 4, "checkpoint_every": 1}
    straight = tiny_config(workdir, run={"name": "drop-straight"}, train=common, model={"unet": {"dropout": 0.3}})
    _cli(workdir, straight, "drop-straight")
    split = tiny_config(workdir, run={"name": "drop-split"}, train={**common, "max_steps": 2},
                        model={"unet": {"dropout": 0.3}})
    _cli(workdir, split, "drop-split")
    split["train"]["max_steps"] = 4
    _cli(workdir, split, "drop-split", "--resume")
    assert_same_training_state(_ckpt(straight, 4), _ckpt(split, 4))


def test_a_continuation_in_a_new_run_dir_matches_the_uninterrupted_run(workdir, reference):
    """seed_continuation (paper_tables --adherence-steps): run B starts from run A's last checkpoint
    and trains on to a larger budget; A stays as it was."""
    import pathlib

    from sgdm.quickstart.variants import seed_continuation

    short = tiny_config(workdir, run={"name": "cont-short"}, train={**FAULT_TRAIN, "max_steps": 6})
    _cli(workdir, short, "cont-short")
    longer = tiny_config(workdir, run={"name": "cont-long"}, train=FAULT_TRAIN)
    runs = pathlib.Path(short["run"]["dir"])
    assert seed_continuation(runs / "cont-short", runs / "cont-long").name == checkpoint_name(6)
    _cli(workdir, longer, "cont-long", "--resume")
    assert_same_training_state(reference, _ckpt(longer, STEPS))
    assert [s for s, _ in list_checkpoints(runs / "cont-short" / "checkpoints")][-1] == 6


def test_resume_in_a_later_epoch_keeps_data_order_and_state(workdir):
    common = {"accumulate": 2, "max_steps": 8, "checkpoint_every": 1}
    straight = tiny_config(workdir, run={"name": "order-straight"}, train=common)
    order = DataRecorder()
    assert run_in_process(straight, callbacks=[order]) == 0
    assert [p for p, _, _ in order.seen] == list(range(16))
    later = tiny_config(workdir, run={"name": "later"}, train={**common, "max_steps": 7})  # step 7: data epoch 1
    first, second = DataRecorder(), DataRecorder()
    assert run_in_process(later, callbacks=[first]) == 0
    later["train"]["max_steps"] = 8
    assert run_in_process(later, resume=True, callbacks=[second]) == 0
    assert first.seen + second.seen == order.seen  # same ids, flips and positions
    assert_same_training_state(_ckpt(straight, 8), _ckpt(later, 8))


def _wait_for(predicate, timeout: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    return False


def test_sigkill_anywhere_then_sigterm_then_resume_matches_uninterrupted(workdir, reference):
    steps = STEPS
    faulty = tiny_config(workdir, run={"name": "faulty"}, train=FAULT_TRAIN)
    path = write_config(workdir, faulty, "faulty.yaml")
    ckpt_dir = workdir / "runs" / "faulty" / "checkpoints"
    rng = random.Random(1234)
    log = open(workdir / "faulty.log", "w")

    # 1) SIGKILL: while a checkpoint is being written if we catch one, else at a random point after the first
    proc = subprocess.Popen(cli_command(path), env=ENV, stdout=log, stderr=log)
    assert _wait_for(lambda: list_checkpoints(ckpt_dir), 180, proc), "no checkpoint appeared"
    delay = time.monotonic() + rng.uniform(0.0, 0.4)
    _wait_for(lambda: time.monotonic() > delay or any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir()), 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = [s for s, _ in list_checkpoints(ckpt_dir)]
    assert killed_at and max(killed_at) < steps, "the run finished before it could be killed"
    (ckpt_dir / f".{checkpoint_name(max(killed_at) + 2)}.999.tmp").write_bytes(b"partial")  # a torn write
    torn = ckpt_dir / checkpoint_name(max(killed_at) + 2)
    torn.write_bytes((ckpt_dir / checkpoint_name(max(killed_at))).read_bytes()[:1000])  # corrupt, real name

    # 2) resume; SIGTERM after the next checkpoint -> a checkpoint at a step boundary and exit code 143. The
    # signal goes to the whole process group, DataLoader workers included, as torchrun's agent (os.killpg) and
    # SLURM at the time limit send it; the workers must outlive it until the checkpoint is written.
    proc = subprocess.Popen(cli_command(path, "--resume", "data.num_workers=2"), env=ENV, stdout=log, stderr=log,
                            start_new_session=True)
    before = {s for s, _ in list_checkpoints(ckpt_dir)}
    assert _wait_for(lambda: {s for s, _ in list_checkpoints(ckpt_dir)} - before, 180, proc), "resume made no progress"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert not any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir()), "leftovers were not cleaned"
    stopped_at = max(s for s, _ in list_checkpoints(ckpt_dir))
    said = f"sgdm: stopped by SIGTERM at step {stopped_at}; wrote {ckpt_dir / checkpoint_name(stopped_at)}; continue"
    assert said in (workdir / "faulty.log").read_text()

    # 3) resume to the end
    proc = subprocess.run(cli_command(path, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log.close()
    if stopped_at < steps:
        assert f"step-{stopped_at:08d}" in proc.stderr + proc.stdout
    assert_same_training_state(reference, _ckpt(faulty, steps))




def test_resume_keeps_the_earlier_csv_metrics(workdir):
    import csv
    import pathlib

    cfg = tiny_config(workdir, run={"name": "csv-logs"}, train={"max_steps": 2, "checkpoint_every": 1, "log_every": 1,
                                                                "logger": "csv"})
    logs = pathlib.Path(cfg["run"]["dir"]) / "csv-logs" / "logs"
    assert run_in_process(cfg) == 0
    first = (logs / "metrics.csv").read_text()
    assert "train/loss" in first
    for k, steps in ((1, 3), (2, 4)):
        cfg["train"]["max_steps"] = steps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run_in_process(cfg, resume=True) == 0
        # Lightning's "previous log files ... will be deleted" would be wrong here: nothing is lost
        assert not [w for w in caught if "will be deleted" in str(w.message)], [str(w.message) for w in caught]
        assert (logs / f"metrics-{k}.csv").is_file() and (logs / "metrics.csv").is_file()
    assert (logs / "metrics-1.csv").read_text() == first  # the segment before the first resume, untouched
    with open(logs / "metrics.csv", newline="") as f:
        steps = [float(row["train/step"]) for row in csv.DictReader(f) if row.get("train/step")]
    assert steps == [4.0]  # only the last segment's step


def test_resume_refuses_a_store_remade_at_the_same_path(tmp_path):
    """The config check compares the annotation.store path; a store annotated again in place (other
    labels, same path) is caught by the content digest the run recorded when it started."""
    import pathlib

    from sgdm.annotation.store import AnnotationStore, write_store
    from sgdm.config.core import ConfigError

    cfg = tiny_config(tmp_path, run={"name": "store-digest"}, train={"max_steps": 2, "checkpoint_every": 1})
    make_label_store(cfg)
    assert run_in_process(cfg) == 0
    record = pathlib.Path(cfg["run"]["dir"]) / "store-digest" / "annotation_store.json"
    assert record.is_file()
    cfg["train"]["max_steps"] = 3
    assert run_in_process(cfg, resume=True) == 0  # the same store: resumes
    store = AnnotationStore.open(cfg["annotation"]["store"])
    shifted = (store.tensor("cluster") + 1) % store.num_classes
    write_store(store.path, store.ids, {"cluster": shifted}, granularity="label", num_classes=store.num_classes)
    cfg["train"]["max_steps"] = 4
    with pytest.raises(ConfigError, match="annotation.store: .* holds other annotations than when this run started"):
        run_in_process(cfg, resume=True)


def test_resume_accepts_a_store_annotated_again_that_only_gained_later_keys(tmp_path):
    """A store annotated again by a later sgdm with the same settings holds the same shards and a manifest
    with more keys (the k-means centroids for cluster adherence, the images' file sizes): the run that
    trained on it resumes. Anything else in the manifest changed still refuses."""
    import json
    import pathlib

    from sgdm.annotation.store import MANIFEST
    from sgdm.config.core import ConfigError

    cfg = tiny_config(tmp_path, run={"name": "store-keys"}, train={"max_steps": 2, "checkpoint_every": 1})
    make_label_store(cfg)
    assert run_in_process(cfg) == 0
    manifest_path = pathlib.Path(cfg["annotation"]["store"]) / MANIFEST
    original = json.loads(manifest_path.read_text())
    grown = dict(original, centroids="centroids.safetensors", centroids_sha256="0" * 64,
                 files_sha256="1" * 64, file_sizes=[[10]] * len(original["ids"]))
    manifest_path.write_text(json.dumps(grown, indent=1))
    cfg["train"]["max_steps"] = 3
    assert run_in_process(cfg, resume=True) == 0
    manifest_path.write_text(json.dumps(dict(grown, method="other"), indent=1))
    cfg["train"]["max_steps"] = 4
    with pytest.raises(ConfigError, match="annotation.store: .* holds other annotations than when this run started"):
        run_in_process(cfg, resume=True)
