"""The reference set read by DataLoader workers (``data.num_workers``): the same images in the same
order as one process reading them, unreadable ones replaced by the next candidates, and a set that
cannot be filled an error."""
import os

import pytest
import torch

from sgdm.evaluation.evaluate import _ReferenceImages, reference_candidates


class _LoggedItems(torch.utils.data.Dataset):
    """Items listed in ``bad`` cannot be read (None, as ``data.on_bad_image: skip`` gives); every read
    appends ``pid index`` to ``log`` (a file: the workers' reads are seen from the main process)."""

    def __init__(self, n, bad, log):
        self.n, self.bad, self.log = n, set(bad), str(log)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {index}\n")
        return None if index in self.bad else {"image": torch.full((3, 2, 2), index / 10.0)}

    def reads(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [tuple(int(v) for v in line.split()) for line in f]

    def forget(self):
        if os.path.exists(self.log):
            os.remove(self.log)


def _sequential(n, size, bad):
    """The reference images one process reading the candidates in order takes."""
    rows = [i for i in reference_candidates(size, n) if i not in bad][:min(n, size)]
    return torch.stack([torch.full((3, 2, 2), i / 10.0) for i in rows])


@pytest.mark.parametrize("bad", [set(), {2, 4, 5, 12}])
def test_workers_read_the_same_images_in_the_same_order(tmp_path, bad):
    """Unreadable images in the middle of the picks and among their stand-ins: the batches the workers
    read are those of a sequential read, and the main process decodes none of them."""
    data = _LoggedItems(14, bad, tmp_path / "reads")
    ref = _ReferenceImages(data, 7, uint8=False, num_workers=2, batch_size=2)
    got = torch.cat(list(ref.batches()))
    assert torch.equal(got, _sequential(7, 14, bad))
    assert data.reads() and all(pid != os.getpid() for pid, _ in data.reads())
    # the rows found on the way serve random access, with no second scan
    data.forget()
    assert torch.equal(ref[6], _sequential(7, 14, bad)[6]) and len(data.reads()) == 1


def test_a_dataloader_over_the_set_reads_each_reference_image_once(tmp_path):
    """torch-fidelity iterates the uint8 set with DataLoader workers after reading item 0 in the main
    process: every worker's copy must know the rows, not scan the candidates again."""
    bad = {2, 4, 5}
    data = _LoggedItems(12, bad, tmp_path / "reads")
    ref = _ReferenceImages(data, 6, uint8=True, num_workers=2, batch_size=2)
    assert ref[0].dtype == torch.uint8  # what torch-fidelity's first check reads
    data.forget()
    loader = torch.utils.data.DataLoader(ref, batch_size=2, num_workers=2)
    got = torch.cat(list(loader))
    expected = ((_sequential(6, 12, bad) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(got, expected)
    rows = [i for i in reference_candidates(12, 6) if i not in bad][:6]
    assert sorted(index for _, index in data.reads()) == sorted(rows)


def test_a_worker_does_not_scan_for_the_rows(tmp_path):
    """A DataLoader's workers over a set whose rows were never found would each scan the candidates."""
    ref = _ReferenceImages(_LoggedItems(6, (), tmp_path / "reads"), 4, uint8=True)
    with pytest.raises(RuntimeError, match=r"rows must be found \(rows\(\)\) before DataLoader workers copy it"):
        list(torch.utils.data.DataLoader(ref, batch_size=2, num_workers=1))


def test_a_set_that_cannot_be_filled_is_an_error_with_workers(tmp_path):
    data = _LoggedItems(5, {0, 2, 3}, tmp_path / "reads")
    ref = _ReferenceImages(data, 4, uint8=False, num_workers=2, batch_size=2)
    with pytest.raises(ValueError, match=r"needs 4 readable images \(eval.reference_n\), but only 2 of the dataset's 5"):
        list(ref.batches())
    with pytest.raises(ValueError, match=r"needs 4 readable images"):
        ref[0]


def test_eval_reads_the_reference_set_with_the_data_workers(tmp_path, monkeypatch):
    """Evaluation reads the reference set with ``data.num_workers`` DataLoader processes, once: fd's
    statistics find the rows that torch-fidelity's uint8 copy then reads."""
    import dataclasses

    import sgdm.evaluation.evaluate as evaluate
    from sgdm.config.schema import load_recorded
    from tests.evaluation.test_evaluate import _folder_run

    run_dir = _folder_run(tmp_path, "skip")  # 6 images, the second unreadable; fd, reference_n 4
    cfg = load_recorded(run_dir / "config.yaml")
    cfg.data = dataclasses.replace(cfg.data, num_workers=2)
    workers = []
    loader = torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        workers.append(kwargs.get("num_workers", 0))
        return loader(*args, **kwargs)

    monkeypatch.setattr(evaluate, "DataLoader", spy)
    ecfg = dataclasses.replace(evaluate.recorded_eval(run_dir), batch_size=2)  # the 4 picks are 2 batches
    evaluator = evaluate._Evaluator(cfg, ecfg, run_dir, log=lambda _msg: None)
    evaluator.check_reference()
    assert evaluator.reference_stats().count == 4 and workers == [2, 1]  # the 4 picks; 1 stand-in, 1 batch
    ref = evaluator.inception_reference()
    assert ref.rows() == [0, 3, 4, 2] and ref[3].dtype == torch.uint8 and workers == [2, 1]  # no scan
