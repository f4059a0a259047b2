"""The dataset model every loader maps onto.

A dataset is a split of a dataset root. Items are plain dicts of numpy arrays so that
augmentation (``labelwise.data.transforms``) and collation stay format-agnostic:

===============  ==========================================================================
key              value
===============  ==========================================================================
``image_id``     str, unique in the split (file stem, or relative path without suffix)
``file_name``    str, the image path relative to the image root (matches COCO ``file_name``)
``image``        ``uint8`` ``H x W x 3`` RGB
``mask``         ``uint8`` ``H x W`` class indices, 0 = background, 255 = ignore (if any)
``tags``         ``float32`` multi-hot of length ``num_classes - 1`` over the *foreground*
                 classes: ``tags[c - 1] == 1`` iff class ``c`` is present (if any)
``parts``        ``uint8`` ``H x W`` part indices (parts datasets)
``objects``      ``uint8`` ``H x W`` object indices (parts datasets)
===============  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset


@dataclass
class DatasetInfo:
    """What a model needs to know about a dataset (saved with each run)."""

    class_names: list[str]                      # index 0 = background
    part_names: list[str] | None = None         # parts datasets: index 0 = background
    part_to_object: list[int] | None = None     # parts datasets: object index of each part

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_foreground(self) -> int:
        return len(self.class_names) - 1


class SegDataset(Dataset):
    """Base class of all loaders: ``ids``, ``class_names`` and ``__getitem__`` -> dict."""

    format: str = ""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        self.ids: list[str] = []
        self.class_names: list[str] = ["background"]

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(class_names=list(self.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # Cheap accessors used by evaluators and tag derivation (no image decoding).
    def image_path(self, index: int) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_mask(self, index: int) -> np.ndarray | None:
        """Semantic label (``uint8`` H x W) of item ``index``, or None if the format has none."""
        return None

    def tags(self, index: int) -> np.ndarray | None:
        """Foreground multi-hot (``float32``, length ``num_classes - 1``) or None if unknown."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
