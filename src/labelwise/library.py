"""labelwise as a Python library: the functions ``import labelwise as lw`` exposes.

* :func:`load` a trained run and :meth:`Run.predict` on images given as paths, PIL images,
  numpy arrays or tensors (one or a batch) -> the method's declared outputs per image;
* :func:`train`, :func:`infer`, :func:`evaluate` -- the functions the CLI commands call;
* :func:`pseudo_masks` -- OAP / MaskCut / TokenCut pseudo-masks of a folder or a dataset split.

``docs/api.md`` shows each with runnable examples.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from labelwise.errors import LabelwiseError

__all__ = ["Run", "load", "train", "infer", "evaluate", "pseudo_masks", "to_rgb_uint8"]


def to_rgb_uint8(image: Any) -> np.ndarray:
    """One image -> ``H x W x 3`` uint8 RGB: a path, a PIL image, a numpy array (``H x W [x 3]``,
    uint8 or floats in [0, 1]) or a tensor (``3 x H x W`` / ``H x W x 3``, uint8 or floats in [0, 1])."""
    from labelwise.io import read_image

    if isinstance(image, (str, Path)):
        return read_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise LabelwiseError(f"an image must be H x W x 3 (or 3 x H x W as a tensor), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, np.float32) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).round()
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _as_list(images: Any) -> tuple[list[Any], bool]:
    """``(images, single)``: a batch (list / tuple, ``N x H x W x 3`` array, ``B x 3 x H x W`` tensor)
    as a list, or one image."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    if hasattr(images, "dim") and images.dim() == 4:
        return list(images), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    return [images], True


class Run:
    """A trained run ready to predict (what :func:`load` returns)."""

    def __init__(self, loaded):
        self._loaded = loaded
        self.method, self.cfg, self.info = loaded.method, loaded.cfg, loaded.info
        self.model, self.state, self.run_dir = loaded.model, loaded.state, loaded.run_dir

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def outputs(self) -> list[str]:
        """The outputs ``predict`` can return (``what``); the first is the default."""
        return list(self.method.outputs)

    def predict(self, images: Any, what: str | Sequence[str] | None = None, batch_size: int | None = None):
        """The method's outputs ``what`` (default: its first) for one image -> a dict ``{what: payload}``,
        or for a batch -> a list of them. Payloads are what ``labelwise infer`` writes, in memory:
        label maps (``H x W`` uint8), CAM seeds (``{"cams": K x H x W, "keys": class ids}``), parts
        (``{"parts", "objects"}``), universal masks (``{"masks": COCO records with RLE and score,
        "clusters": H x W}``), at the image's own size."""
        import torch

        from labelwise.engine.api import parse_what
        from labelwise.engine.method import PredictContext
        from labelwise.engine.predict import same_size_batches

        whats = parse_what(what, self.method)
        batch, single = _as_list(images)
        tf = self.method.inference_transform(self.cfg, self.info)
        items = []
        for k, img in enumerate(batch):
            name = Path(img).stem if isinstance(img, (str, Path)) else f"image_{k}"
            items.append(tf({"image": to_rgb_uint8(img), "image_id": name, "file_name": name}))
        ctx = PredictContext(cfg=self.cfg, info=self.info, what=whats, device=self.device, state=self.state)
        bs = batch_size or self.cfg.infer.batch_size
        results: list[dict] = []
        with torch.inference_mode():
            for group in same_size_batches(items, bs):
                inputs = torch.stack([it["input"] for it in group]).to(self.device)
                results += self.method.predict(self.model, {"inputs": inputs, "items": group}, ctx)
        out = [{w: r[w] for w in whats} for r in results]
        return out[0] if single else out


def load(run_dir: str | Path, device: str = "auto", checkpoint: str | Path | None = None,
         **infer_settings: Any) -> Run:
    """A trained run (the ``--out`` folder of ``labelwise train``) ready for :meth:`Run.predict`.
    ``infer_settings`` set ``infer.*`` keys for this session, e.g. ``bg_threshold=0.4``."""
    from labelwise.engine.api import load_run

    overrides = [f"infer.{k}={json.dumps(v)}" for k, v in infer_settings.items()]
    return Run(load_run(run_dir, device=device, checkpoint=checkpoint, overrides=overrides))


def train(method: str, data: str, out: str | Path, **kwargs: Any) -> Path:
    """``labelwise train`` (see :func:`labelwise.engine.api.train` for the keywords: ``preset``,
    ``overrides``, ``steps``, ``epochs``, ``labels``, ``seeds``, ``show_progress``)."""
    from labelwise.engine.api import train as _train

    return _train(method, data, out, **kwargs)


def infer(run_dir: str | Path, data: str, split: str, out: str | Path, **kwargs: Any) -> Path:
    """``labelwise infer``: every output file of a dataset split (see :func:`labelwise.engine.api.infer`)."""
    from labelwise.engine.api import infer as _infer

    return _infer(run_dir, data, split, out, **kwargs)


def evaluate(kind: str, pred: Any, gt: str, split: str | None = None, **options: Any) -> dict:
    """``labelwise evaluate``: the metrics of ``pred`` (a folder or json) against dataset ``gt``."""
    from labelwise.evaluation import evaluate as _evaluate

    return _evaluate(kind, pred, gt, split, **options)


def pseudo_masks(method: str, images: str | Path, out: str | Path | None = None, *, split: str | None = None,
                 device: str = "cpu", show_progress: bool = False, **flags: Any) -> list[dict]:
    """``labelwise pseudo-masks METHOD``: the masks of every image of a folder (or of a dataset split,
    ``images="FORMAT:PATH"`` with ``split``) as COCO records (RLE, score, file_name). ``flags``:
    ``backbone``, ``weights``, ``resolution``, ``levels``, ``clusters``... as on the command line;
    ``out``: also keep the json there."""
    from labelwise.pseudo.runner import generate, generate_from_spec

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(out) if out is not None else Path(tmp) / "masks.json"
        if ":" in str(images) and not Path(str(images)).exists():
            generate_from_spec(method, str(images), split, dst, device=device, show_progress=show_progress, **flags)
        else:
            if not Path(images).is_dir():
                raise LabelwiseError(f"{images}: folder not found; pass a folder of images or a FORMAT:PATH spec")
            generate(method, images, dst, device=device, show_progress=show_progress, **flags)
        return json.loads(dst.read_text())


def export(run_dir: str | Path, fmt: str, out: str | Path, **options: Any) -> dict:
    """``labelwise export``: the run's weights with its config (``fmt="safetensors"``), or images ->
    raw maps as ``"onnx"`` / ``"torchscript"`` checked against PyTorch; ``options``: ``size=(h, w)``,
    ``opset``, ``tol`` (see :func:`labelwise.engine.export.export_run`). Returns a summary."""
    from labelwise.engine.export import export_run

    return export_run(run_dir, fmt, out, **options)


def coco_dataset(results: str | Path, out: str | Path | None = None) -> Path:
    """A COCO *results* json (``pseudo_masks(..., out=...)``, ``--what universal``) rewritten as a COCO
    *dataset* a detector trains on (images with sizes, RLE annotations with area and bbox, one
    class-agnostic category, scores kept): ``out`` (default: beside it, ``*_dataset.json``)."""
    from labelwise.masks import write_coco_dataset

    results = Path(results)
    dst = Path(out) if out is not None else results.with_name(f"{results.stem}_dataset.json")
    if not write_coco_dataset(results, dst):
        raise LabelwiseError(f"{results}: not a COCO results list; pass the json of pseudo-masks or --what universal")
    return dst
