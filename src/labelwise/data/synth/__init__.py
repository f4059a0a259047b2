"""Synthetic testbeds: small, deterministic datasets in the standard formats.

``generate(kind, out_dir, ...)`` writes one of

* ``cooc``    -- VOC layout; textured shapes on context backgrounds with co-occurring
  class pairs (SeCo's co-occurrence / false-activation problem);
* ``parts``   -- parts layout; objects made of parts, some parts alike across objects
  (CoCal / PartImageNet-style part parsing);
* ``objects`` -- COCO layout with RLE masks; thing instances (some touching, same class)
  on stuff bands (OAP pseudo-masks; instance / semantic / panoptic evaluation).

Every image is drawn from its own ``numpy`` generator seeded from
``(seed, kind, split, index)``, so the output is byte-identical for a seed and image
``i`` does not depend on how many images are generated. ``OUT_DIR/meta.json`` records
the generator, its parameters and measured statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labelwise.errors import LabelwiseError

KINDS = ("cooc", "parts", "objects")
SPEC_FORMAT = {"cooc": "voc", "parts": "parts", "objects": "coco"}  # the --data format each testbed is read with
DEFAULT_TRAIN = 200
DEFAULT_VAL = 50
DEFAULT_SIZE = 128
DEFAULT_SEED = 0

__all__ = ["KINDS", "SPEC_FORMAT", "generate", "options", "load_meta", "testbed_spec", "mask_seeds", "DEFAULT_TRAIN", "DEFAULT_VAL",
           "DEFAULT_SIZE"]


def testbed_spec(kind: str, root: str | Path) -> str:
    """The ``--data`` spec of testbed ``kind`` written to ``root`` (``voc:ROOT``, ``parts:ROOT``, ``coco:ROOT``)."""
    _module(kind)
    return f"{SPEC_FORMAT[kind]}:{Path(root).expanduser().resolve()}"


def _module(kind: str):
    if kind not in KINDS:
        raise LabelwiseError(f"synth: unknown testbed {kind!r}; choose one of {', '.join(KINDS)}")
    import importlib

    return importlib.import_module(f"labelwise.data.synth.{kind}")


def options(kind: str) -> dict[str, tuple[Any, float | None, float | None, str]]:
    """The extra options of a testbed: name -> (default, min, max, help)."""
    return dict(_module(kind).OPTIONS)


def generate(kind: str, out_dir: str | Path, *, n_train: int = DEFAULT_TRAIN, n_val: int = DEFAULT_VAL,
             size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED, overwrite: bool = False,
             **opts: Any) -> Path:
    """Write the testbed ``kind`` to ``out_dir`` and return ``out_dir`` as a Path.

    ``opts`` are the testbed's options (see :func:`options`), e.g. ``context_rate=0.8``
    for ``cooc``. A non-empty ``out_dir`` that is not a testbed of the same kind is
    refused unless ``overwrite``.
    """
    from labelwise import __version__
    from labelwise.data.synth import common
    from labelwise.io import atomic_write_json

    mod = _module(kind)
    common.check_counts(n_train, n_val, size, seed)
    resolved = common.resolve_options(kind, mod.OPTIONS, opts)
    out_dir = common.prepare_out_dir(out_dir, kind, overwrite)
    splits = {"train": int(n_train), "val": int(n_val)}
    info = mod.generate(out_dir, splits, int(size), int(seed), resolved)
    meta = {
        "generator": f"labelwise.data.synth.{kind}",
        "kind": kind,
        "labelwise_version": __version__,
        "seed": int(seed),
        "size": int(size),
        "splits": splits,
        "options": resolved,
        **info,
    }
    atomic_write_json(out_dir / common.META, meta)
    return out_dir


def load_meta(out_dir: str | Path) -> dict:
    """The ``meta.json`` of a testbed (raises LabelwiseError if missing)."""
    from labelwise.data.synth import common

    meta = common.read_meta(Path(out_dir))
    if meta is None:
        raise LabelwiseError(f"{Path(out_dir) / common.META}: not found or unreadable; "
                             "generate the testbed with `labelwise data synth`")
    return meta


def mask_seeds(spec: str, split: str, out: str | Path, blur: int = 9, peak: float = 0.9) -> Path:
    """Stand-in CAM seeds of a split made from its masks (for tests and benchmarks of seed refiners
    such as ``irn``, never for reported figures): ``out/<image_id>.npz`` with ``cams`` (each present
    class's mask box-blurred over ``blur`` px and scaled to ``peak``, float16, K x H x W) and ``keys``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from labelwise.data.spec import build_dataset
    from labelwise.io import atomic_save_npz

    ds = build_dataset(spec, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(ds)):
        m = torch.from_numpy(ds.load_mask(i).astype(np.int64))
        keys = [int(c) for c in torch.unique(m).tolist() if 0 < c < 255]
        cams = torch.zeros(0, *m.shape)
        if keys:
            onehot = torch.stack([(m == k).float() for k in keys])[None]
            cams = peak * F.avg_pool2d(onehot, blur, 1, blur // 2, count_include_pad=False)[0]
        atomic_save_npz(out / f"{ds.ids[i]}.npz", cams=cams.numpy().astype(np.float16),
                        keys=np.asarray(keys, np.int64))
    return out
