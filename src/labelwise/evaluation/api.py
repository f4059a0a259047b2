"""``evaluate(kind, pred, gt_spec, split=None, **options) -> dict``: the one entry point that the
``labelwise evaluate`` CLI, the demo and scripts use.

=============  ==============================================  =================================
kind           ``pred``                                        ground truth (``gt_spec``)
=============  ==============================================  =================================
semantic       folder of ``<image_id>.png`` class indices, or  any dataset with masks
               of CAM seeds ``<image_id>.npz`` scored with
               ``bg_threshold`` (argmax of the present
               classes, background where <= the threshold)
parts          folder with ``parts/`` and ``objects/`` PNGs    ``parts:`` (or adapter) dataset
instance       COCO results json (list)                        ``coco:`` dataset
panoptic       COCO-panoptic folder or instance results json   ``coco:`` dataset
unsupervised   folder of ``<image_id>.png`` cluster ids        any dataset with masks
=============  ==============================================  =================================

``gt_spec`` is a ``FORMAT:PATH`` spec (built with :func:`labelwise.data.build_dataset`) or
an already built dataset. Every ground-truth image must have a prediction: a missing file
or a size mismatch is a :class:`~labelwise.errors.LabelwiseError` naming the file. Under
``torch.distributed`` each rank reads a strided share of the images and the metrics are
reduced across ranks (every rank gets the full result).

Options: ``ignore_index`` (255), ``progress`` (True), ``device`` ("cpu"); semantic:
``bg_threshold`` (None: PNG predictions; a number: ``.npz`` seeds thresholded); instance:
``class_aware`` (False), ``hungarian`` (False: cluster ids mapped to categories, see
:class:`~labelwise.evaluation.instance.InstanceEvaluator`), ``max_dets`` (100), ``level`` ("instance": results that carry a
``level`` -- universal masks, OAP pseudo-masks -- are scored on their instance-level masks;
"semantic" or "all" pick the others; results without ``level`` always count); panoptic:
``score_thresh`` (None), ``class_agnostic`` (False), ``level`` ("all"); unsupervised: ``num_clusters`` (None: inferred from the
largest id in the predictions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from labelwise.dist import get_rank, get_world_size
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX, read_json, read_label
from labelwise.utils import progress

__all__ = ["evaluate", "run_evaluation", "KINDS"]

KINDS = ("semantic", "parts", "instance", "panoptic", "unsupervised")


def _dataset(gt_spec: Any, split: str | None):
    if isinstance(gt_spec, (str, Path)):
        from labelwise.data import build_dataset

        return build_dataset(str(gt_spec), split)
    return gt_spec


def _indices(n: int) -> range:
    return range(get_rank(), n, get_world_size())


def _iter(sel, desc: str, show: bool):
    return progress(sel, desc=desc, total=len(sel)) if show else sel


def _pred_dir(pred: Any, what: str) -> Path:
    p = Path(pred)
    if not p.is_dir():
        raise LabelwiseError(f"{p}: prediction folder not found; pass the PRED_DIR that 'labelwise infer' wrote ({what})")
    return p


def _read_pred(path: Path, image_id: str, shape: tuple[int, ...], reader=None) -> np.ndarray:
    if not path.is_file():
        raise LabelwiseError(f"{path}: no prediction for ground-truth image '{image_id}'; predict every image "
                             "of the split")
    pred = (reader or read_label)(path)
    if pred.shape != tuple(shape):
        raise LabelwiseError(f"{path}: prediction is {pred.shape[0]}x{pred.shape[1]} but the ground truth of "
                             f"'{image_id}' is {shape[0]}x{shape[1]}; predict at the ground-truth resolution")
    return pred


def _gt_mask(ds, i: int) -> np.ndarray:
    m = ds.load_mask(i)
    if m is None:
        raise LabelwiseError(f"{ds.root}: the dataset has no segmentation labels for '{ds.ids[i]}'; evaluate "
                             "against a split with masks")
    return m


def _update_named(path: Path, fn, *args) -> None:
    try:
        fn(*args)
    except LabelwiseError as e:
        raise LabelwiseError(f"{path}: {e}") from None


def _read_seeds_as_label(path: Path, image_id: str, shape: tuple[int, ...], bg_threshold: float) -> np.ndarray:
    """CAM seeds ``.npz`` -> label map: argmax over the present classes, background where <= ``bg_threshold``."""
    import torch

    from labelwise.blocks.cam import cam_to_label
    from labelwise.data.overrides import read_seeds

    if not path.is_file():
        raise LabelwiseError(f"{path}: no seeds for ground-truth image '{image_id}'; write seeds for every image "
                             "of the split (labelwise infer RUN --what seeds)")
    seeds = read_seeds(path)
    if seeds["cams"].shape[1:] != tuple(shape):
        raise LabelwiseError(f"{path}: seeds are {seeds['cams'].shape[1]}x{seeds['cams'].shape[2]} but the ground "
                             f"truth of '{image_id}' is {shape[0]}x{shape[1]}; write seeds at the image resolution")
    if len(seeds["keys"]) == 0:
        return np.zeros(shape, np.uint8)
    return cam_to_label(torch.from_numpy(seeds["cams"]), keys=torch.from_numpy(seeds["keys"]),
                        bg_threshold=bg_threshold).numpy().astype(np.uint8)


def _label_maps(kind: str, pred, ds, metric, show: bool, device, bg_threshold: float | None = None,
                reader=None):
    """Feed ``PRED/<image_id>.png`` (or ``.npz`` seeds thresholded at ``bg_threshold``) and the
    ground-truth mask of every image to ``metric``."""
    import torch

    root = _pred_dir(pred, kind)
    if bg_threshold is None and len(ds) and not (root / f"{ds.ids[0]}.png").is_file() \
            and (root / f"{ds.ids[0]}.npz").is_file():
        raise LabelwiseError(f"{root}: holds CAM seeds (.npz), not label PNGs; pass --bg-threshold T to score the "
                             "seeds as masks")
    for i in _iter(_indices(len(ds)), f"evaluate {kind}", show):
        gt = _gt_mask(ds, i)
        if bg_threshold is None:
            path = root / f"{ds.ids[i]}.png"
            p = _read_pred(path, ds.ids[i], gt.shape, reader)
        else:
            path = root / f"{ds.ids[i]}.npz"
            p = _read_seeds_as_label(path, ds.ids[i], gt.shape, bg_threshold)
        _update_named(path, metric.update, torch.from_numpy(p).to(device), torch.from_numpy(gt).to(device))
    return metric.compute(), metric


def _semantic(pred, ds, ignore_index=IGNORE_INDEX, show=True, device="cpu", bg_threshold=None, **_):
    from labelwise.evaluation.semantic import SemanticMetric

    if bg_threshold is not None and not 0.0 <= float(bg_threshold) <= 1.0:
        raise LabelwiseError(f"--bg-threshold must be in [0, 1] (CAMs are max-normalised), got {bg_threshold}")
    metric = SemanticMetric(len(ds.class_names), list(ds.class_names), ignore_index)
    return _label_maps("semantic", pred, ds, metric, show, device, bg_threshold)


def _unsupervised(pred, ds, ignore_index=IGNORE_INDEX, show=True, device="cpu", num_clusters=None, **_):
    from labelwise.evaluation.unsupervised import UnsupervisedMetric

    from labelwise.io import read_cluster_map

    # cluster maps: 8-bit (255 = none) or 16-bit for more than 255 clusters (65535 = none) -> -1
    metric = UnsupervisedMetric(num_clusters, len(ds.class_names), list(ds.class_names), ignore_index, unassigned=-1)
    return _label_maps("unsupervised", pred, ds, metric, show, device, reader=read_cluster_map)


def _parts(pred, ds, ignore_index=IGNORE_INDEX, show=True, device="cpu", **_):
    from labelwise.evaluation.parts import PartsMetric
    import torch

    if getattr(ds, "part_names", None) is None:
        raise LabelwiseError(f"{ds.root}: not a parts dataset; evaluate parts against a parts:ROOT spec")
    root = _pred_dir(pred, "parts")
    for sub in ("parts", "objects"):
        if not (root / sub).is_dir():
            raise LabelwiseError(f"{root / sub}: folder not found; part predictions live in PRED/parts/ and "
                                 "PRED/objects/")
    object_names = list(getattr(ds, "object_names", ds.class_names))
    metric = PartsMetric(list(ds.part_names), object_names, [int(x) for x in ds.part_to_object], ignore_index)
    for i in _iter(_indices(len(ds)), "evaluate parts", show):
        pg, og = ds.load_parts(i), ds.load_objects(i)
        if pg is None:
            raise LabelwiseError(f"{ds.root}: no part labels for '{ds.ids[i]}'")
        pp_path, op_path = root / "parts" / f"{ds.ids[i]}.png", root / "objects" / f"{ds.ids[i]}.png"
        pp = _read_pred(pp_path, ds.ids[i], pg.shape)
        op = _read_pred(op_path, ds.ids[i], og.shape)
        t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        _update_named(pp_path, metric.update, t(pp), t(pg), t(op), t(og))
    return metric.compute(), metric


def _load_results(pred: Any) -> list[dict]:
    if isinstance(pred, list):
        return pred
    path = Path(pred)
    data = read_json(path, "prediction json not found; pass the FILE.json of COCO results",
                     "not a valid JSON file; pass a COCO results json")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LabelwiseError(f"{path}: expected a list of COCO results ({{image_id|file_name, category_id, "
                             "segmentation, score}})")
    for k, r in enumerate(data):
        if "segmentation" not in r or "score" not in r or ("image_id" not in r and "file_name" not in r):
            raise LabelwiseError(f"{path}: result {k} lacks segmentation, score or image_id/file_name")
    return data


LEVELS = ("instance", "semantic", "all")


def _select_level(results: list[dict], level: str | None) -> list[dict]:
    """Results of one ``level`` (``instance`` / ``semantic``; ``all`` or None = every result); a
    result without a ``level`` key belongs to every level."""
    if level in (None, "all"):
        return results
    if level not in LEVELS:
        raise LabelwiseError(f"level {level!r}: choose one of {', '.join(LEVELS)}")
    return [r for r in results if r.get("level", level) == level]


def _coco_gt(ds):
    if getattr(ds, "annotation_file", None) is None:
        raise LabelwiseError(f"{getattr(ds, 'root', ds)}: instance and panoptic evaluation need a coco:ROOT "
                             "ground truth")
    return ds


def _instance(pred, ds, class_aware=False, max_dets=100, level="instance", hungarian=False, **_):
    from labelwise.evaluation.instance import InstanceEvaluator

    ds = _coco_gt(ds)
    ev = InstanceEvaluator(ds.coco, class_aware=class_aware, max_dets=max_dets, hungarian=hungarian)
    results = _select_level(_load_results(pred), level)
    # Each rank contributes a strided share; compute() gathers them on rank 0.
    ev.update(results[get_rank()::get_world_size()])
    return ev.compute(), ev


def _gt_panoptic(coco, img: dict, cat_map) -> tuple[np.ndarray, list[dict]]:
    from labelwise.masks import decode_mask

    h, w = int(img["height"]), int(img["width"])
    anns = coco.imgToAnns.get(img["id"], [])
    stuff = [a for a in anns if not coco.cats[a["category_id"]].get("isthing", 1)]
    things = [a for a in anns if coco.cats[a["category_id"]].get("isthing", 1)]
    ids = np.zeros((h, w), dtype=np.int64)
    segments = []
    decoded = []
    for a in stuff + things:
        m = decode_mask(a["segmentation"], h, w)
        decoded.append((a, m))
    n_stuff = len(stuff)
    order = list(range(n_stuff)) + sorted(range(n_stuff, len(decoded)), key=lambda j: -int(decoded[j][1].sum()))
    for k, j in enumerate(order, 1):
        a, m = decoded[j]
        ids[m] = k
        segments.append({"id": k, "category_id": cat_map(a["category_id"]), "iscrowd": int(a.get("iscrowd", 0))})
    return ids, segments


def _panoptic(pred, ds, show=True, score_thresh=None, class_agnostic=False, level="all", **_):
    from labelwise.evaluation.panoptic import PanopticMetric, paint_instances, rgb2id
    from labelwise.evaluation.instance import match_images
    from labelwise.masks import decode_masks

    ds = _coco_gt(ds)
    coco = ds.coco
    if class_agnostic:
        categories = [{"id": 1, "name": "object", "isthing": 1}]
        cat_map = lambda c: 1  # noqa: E731
    else:
        categories = [{"id": c["id"], "name": c.get("name", str(c["id"])), "isthing": int(c.get("isthing", 1))}
                      for c in sorted(coco.dataset["categories"], key=lambda c: c["id"])]
        cat_map = lambda c: int(c)  # noqa: E731
    metric = PanopticMetric(categories)
    images = sorted(coco.dataset["images"], key=lambda im: im["id"])
    pred_path = Path(pred)
    # Predicted (ids, segments) per ground-truth image id, built lazily.
    if pred_path.is_dir():
        pj = pred_path / "panoptic.json"
        pdata = read_json(pj, "not found; a panoptic prediction folder needs panoptic.json with "
                              "segments_info and the PNGs it names")
        anns = pdata.get("annotations") if isinstance(pdata, dict) else None
        if not isinstance(anns, list):
            raise LabelwiseError(f"{pj}: expected {{\"annotations\": [{{file_name, segments_info}}, ...]}}")
        ids = {im["id"] for im in images}
        by_stem = {Path(im["file_name"]).with_suffix("").as_posix(): im["id"] for im in images}
        by_stem.update({Path(im["file_name"]).stem: im["id"] for im in images})
        per_image: dict[Any, dict] = {}
        for a in anns:
            iid = a.get("image_id") if a.get("image_id") in ids else None
            if iid is None:
                stem = Path(str(a.get("file_name", ""))).with_suffix("").as_posix()
                iid = by_stem.get(stem, by_stem.get(Path(stem).name))
            if iid is None:
                raise LabelwiseError(f"{pj}: annotation for {a.get('file_name', a.get('image_id'))!r} matches no "
                                     "ground-truth image; name images by image_id or file name")
            per_image[iid] = a

        def load(img):
            a = per_image.get(img["id"])
            if a is None:
                raise LabelwiseError(f"{pj}: no annotation for ground-truth image {img['file_name']!r}; predict "
                                     "every image of the split")
            f = pred_path / a["file_name"]
            if not f.is_file():
                f = pred_path / "panoptic" / a["file_name"]
            if not f.is_file():
                raise LabelwiseError(f"{pred_path / a['file_name']}: panoptic PNG not found")
            from PIL import Image

            arr = np.asarray(Image.open(f).convert("RGB"))
            segs = [{"id": int(s["id"]), "category_id": cat_map(s["category_id"])} for s in a.get("segments_info", [])]
            return f, rgb2id(arr), segs
    else:
        results = match_images(coco, _select_level(_load_results(pred), level), source=str(pred))
        grouped: dict[Any, list[dict]] = {}
        for r in results:
            if score_thresh is not None and float(r["score"]) < score_thresh:
                continue
            grouped.setdefault(r["image_id"], []).append(r)

        def load(img):
            h, w = int(img["height"]), int(img["width"])
            rs = grouped.get(img["id"], [])
            masks = decode_masks([r["segmentation"] for r in rs], h, w)
            if masks.shape[1:] != (h, w):
                raise LabelwiseError(f"{pred}: masks of image {img['file_name']!r} are {masks.shape[1]}x"
                                     f"{masks.shape[2]}, the ground truth is {h}x{w}")
            pid, segs = paint_instances(masks, [float(r["score"]) for r in rs],
                                        [cat_map(r.get("category_id", 1)) for r in rs])
            return Path(str(pred)), pid, segs

    sel = _indices(len(images))
    for k in _iter(sel, "evaluate panoptic", show):
        img = images[k]
        gid, gsegs = _gt_panoptic(coco, img, cat_map)
        f, pid, psegs = load(img)
        if pid.shape != gid.shape:
            raise LabelwiseError(f"{f}: prediction is {pid.shape[0]}x{pid.shape[1]} but the ground truth of "
                                 f"{img['file_name']!r} is {gid.shape[0]}x{gid.shape[1]}")
        _update_named(f, metric.update, pid, psegs, gid, gsegs)
    return metric.compute(), metric


_RUNNERS = {"semantic": _semantic, "parts": _parts, "instance": _instance, "panoptic": _panoptic,
            "unsupervised": _unsupervised}


def run_evaluation(kind: str, pred: Any, gt_spec: Any, split: str | None = None, **options):
    """Like :func:`evaluate` but returns ``(result, metric)`` (the metric formats the table)."""
    if kind not in _RUNNERS:
        raise LabelwiseError(f"unknown evaluation kind {kind!r}; choose one of {', '.join(KINDS)}")
    ds = _dataset(gt_spec, split)
    show = bool(options.pop("progress", True))
    return _RUNNERS[kind](pred, ds, show=show, **options)


def evaluate(kind: str, pred: Any, gt_spec: Any, split: str | None = None, **options) -> dict[str, Any]:
    """Score predictions ``pred`` of ``kind`` against dataset ``gt_spec`` (split ``split``); flat result dict.

    Undefined values are NaN (``labelwise.evaluation.jsonable`` makes them ``null`` for JSON).
    """
    return run_evaluation(kind, pred, gt_spec, split, **options)[0]
