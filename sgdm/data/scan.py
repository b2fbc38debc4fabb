"""Pre-scan a whole dataset for unreadable files (what ``validate-data`` runs)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from sgdm.data.base import ImageDataset, SkippedItem


@dataclass
class Scan:
    """What a scan found: ``bad`` the unreadable items in index order; ``oriented`` the indices of
    readable images whose EXIF orientation (as stored) is not upright, applied or not."""

    bad: list[SkippedItem] = field(default_factory=list)
    oriented: list[int] = field(default_factory=list)


class _Checks(Dataset):
    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Optional[SkippedItem], int]:
        return (index, *self.dataset.inspect(index))


def scan_dataset(dataset: ImageDataset, num_workers: int = 0,
                 report: Optional[Callable[[SkippedItem], None]] = None, progress: bool = False) -> Scan:
    """Every item that cannot be read, in index order (``report`` is called on each as found), and the
    images that carry an EXIF orientation, from the same single read of each item.

    progress: show a progress bar on stderr (tqdm).
    """
    from tqdm import tqdm

    loader = DataLoader(_Checks(dataset), batch_size=16, num_workers=num_workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(0))
    found = Scan()
    bar = tqdm(total=len(dataset), unit="img", disable=not progress, file=sys.stderr, leave=False)
    for chunk in loader:
        bar.update(len(chunk))
        for index, item, orientation in chunk:
            if orientation != 1:
                found.oriented.append(index)
            if item is not None:
                found.bad.append(item)
                if report is not None:
                    bar.clear()
                    report(item)
    bar.close()
    return found
