"""Pre-scan a whole dataset for unreadable files (what ``validate-data`` runs)."""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from sgdm.data.base import ImageDataset, SkippedItem


class _Checks(Dataset):
    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Optional[SkippedItem]:
        return self.dataset.check(index)


def scan_dataset(dataset: ImageDataset, num_workers: int = 0,
                 report: Optional[Callable[[SkippedItem], None]] = None, progress: bool = False) -> list[SkippedItem]:
    """Every item that cannot be read, in index order; ``report`` is called on each as found.

    progress: show a progress bar on stderr (tqdm).
    """
    from tqdm import tqdm

    loader = DataLoader(_Checks(dataset), batch_size=16, num_workers=num_workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(0))
    bad = []
    bar = tqdm(total=len(dataset), unit="img", disable=not progress, file=sys.stderr, leave=False)
    for chunk in loader:
        bar.update(len(chunk))
        for item in chunk:
            if item is not None:
                bad.append(item)
                if report is not None:
                    bar.clear()
                    report(item)
    bar.close()
    return bad
