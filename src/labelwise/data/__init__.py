"""Datasets: ``build_dataset("FORMAT:PATH", split)`` -> :class:`SegDataset` (items are dicts).

See :mod:`labelwise.data.spec` for the registry and validation, :mod:`.files` for the
file-backed base class, one module per format
(:mod:`.voc`, :mod:`.coco`, :mod:`.parts`, :mod:`.folder`), :mod:`.adapters` for official
releases, :mod:`.tags` for image-level tags and :mod:`.transforms` for joint augmentation.
"""

from labelwise.data.base import DatasetInfo, SegDataset
from labelwise.data.files import FileDataset
from labelwise.data.spec import (
    FORMATS,
    available_formats,
    build_dataset,
    parse_spec,
    register_format,
    skip_bad_items,
    validate,
)

__all__ = ["DatasetInfo", "SegDataset", "FileDataset", "FORMATS", "available_formats", "build_dataset",
           "parse_spec", "register_format", "skip_bad_items", "validate"]
