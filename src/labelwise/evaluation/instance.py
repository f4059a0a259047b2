"""Instance segmentation / detection metrics with pycocotools' COCOeval.

:class:`InstanceEvaluator` collects predictions in the COCO results format (a list of
``{image_id | file_name, category_id, segmentation: RLE, score[, bbox]}``) and scores
them against a COCO ground-truth json with ``COCOeval`` twice: ``iouType="segm"`` gives
``ap`` (AP@[.5:.95]), ``ap50``, ``ap75``, ``ap_small``/``ap_medium``/``ap_large`` and
``ar1``/``ar10``/``ar100``; ``iouType="bbox"`` gives ``box_ap``, ``box_ap50``, ``box_ap75``
(boxes computed from the masks when a prediction has none).

* Class-agnostic by default (the unsupervised setting of OAP/U2Seg/CutLER): ground-truth
  categories with ``"isthing": 0`` (stuff) are dropped, every remaining annotation and
  every prediction is put into a single category. ``class_aware=True`` keeps the
  ground-truth categories (all of them) and compares ``category_id``.
* ``hungarian=True`` (unsupervised methods whose ``category_id`` is a cluster id, e.g. OAP's
  universal masks): every prediction votes for the ground-truth category of the instance it
  overlaps best in its image (mask IoU >= 0.5); a one-to-one Hungarian assignment of clusters to
  categories maximises the votes, each prediction takes its cluster's category and the scoring is
  class-aware. Predictions of clusters left without a category are scored as a category of
  their own that has no ground truth (COCOeval then ignores them: they lower no AP and add no
  recall).
* A prediction may name its image by ``file_name`` instead of (or as well as)
  ``image_id``: it is matched to the ground truth image with the same ``file_name``
  (exactly, else by base name when that is unique). Unknown file names or ids are an
  error that lists them.
* No predictions at all -> every AP/AR is 0. A value COCOeval reports as -1 (no ground
  truth for it, e.g. no small objects) is NaN.
* Under ``torch.distributed`` each rank ``update()``\\ s its share; ``compute()`` gathers
  the predictions (``all_gather_object``), rank 0 runs COCOeval and every rank returns
  rank 0's result.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any, Iterable

from labelwise.dist import all_gather_object, get_rank
from labelwise.errors import LabelwiseError
from labelwise.evaluation.base import format_table
from labelwise.io import read_json

__all__ = ["InstanceEvaluator", "load_coco", "match_images"]

SEGM_KEYS = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100",
             "ar_small", "ar_medium", "ar_large"]
BOX_KEYS = ["box_ap", "box_ap50", "box_ap75"]


def load_coco(gt: Any):
    """A pycocotools ``COCO`` from a COCO object, a dataset dict or a json path (quietly)."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        data = read_json(gt, "ground-truth COCO json not found")
    elif isinstance(gt, dict):
        data = gt
    else:
        raise TypeError(f"cannot read COCO ground truth from {type(gt).__name__}")
    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def match_images(coco, preds: Iterable[dict], source: str = "predictions") -> list[dict]:
    """Copies of ``preds`` with ``image_id`` set to the ground-truth id (from ``image_id`` or ``file_name``)."""
    imgs = coco.dataset.get("images", [])
    ids = {img["id"] for img in imgs}
    by_name = {img.get("file_name"): img["id"] for img in imgs if img.get("file_name")}
    by_base: dict[str, list] = {}
    for img in imgs:
        if img.get("file_name"):
            by_base.setdefault(Path(img["file_name"]).name, []).append(img["id"])
    out, unknown = [], []
    for p in preds:
        q = dict(p)
        if "image_id" in q and q["image_id"] in ids:
            out.append(q)
            continue
        fn = q.get("file_name")
        iid = None
        if fn is not None:
            iid = by_name.get(fn)
            if iid is None:
                cands = by_base.get(Path(fn).name, [])
                iid = cands[0] if len(cands) == 1 else None
        if iid is None:
            unknown.append(str(fn if fn is not None else q.get("image_id")))
            continue
        q["image_id"] = iid
        out.append(q)
    if unknown:
        uniq = sorted(set(unknown))
        more = f" (and {len(uniq) - 5} more)" if len(uniq) > 5 else ""
        raise LabelwiseError(f"{source}: {len(uniq)} image(s) not in the ground truth: {', '.join(uniq[:5])}{more}; "
                             "predictions must name ground-truth images by file_name or image_id")
    return out


def _check_segmentations(coco, records: Iterable[dict], what: str) -> None:
    """One line naming the first record whose segmentation cannot be decoded faithfully (pycocotools
    would stop with "input type is not supported" or score a truncated RLE as a different mask)."""
    from labelwise.masks import segmentation_problem

    imgs = coco.imgs
    for k, r in enumerate(records):
        if "segmentation" not in r:  # box-only ground truth: nothing to decode
            continue
        img = imgs.get(r.get("image_id"), {})
        problem = segmentation_problem(r.get("segmentation"), img.get("height"), img.get("width"))
        if problem is not None:
            name = f"{what} {r['id']}" if "id" in r else f"{what} #{k}"
            raise LabelwiseError(f"{name} (image {img.get('file_name', r.get('image_id'))}): {problem}; fix or "
                                 "remove it")


class InstanceEvaluator:
    """COCO mask (and box) AP/AR of results against a ground truth (path, dict or ``COCO``)."""

    def __init__(self, gt: Any, class_aware: bool = False, max_dets: int = 100, hungarian: bool = False):
        self.gt = load_coco(gt)
        _check_segmentations(self.gt, self.gt.dataset.get("annotations", []), "ground-truth annotation")
        self.hungarian = bool(hungarian)
        self.class_aware = bool(class_aware) or self.hungarian
        self.max_dets = int(max_dets)
        self.results: list[dict] = []
        self._gt_eval = self._things_gt() if self.hungarian else self.gt if class_aware else self._agnostic_gt()

    def _agnostic_gt(self):
        data = self.gt.dataset
        stuff = {c["id"] for c in data.get("categories", []) if c.get("isthing", 1) == 0}
        anns = []
        for a in data.get("annotations", []):
            if a.get("category_id") in stuff:
                continue
            a = dict(a)
            a["category_id"] = 1
            anns.append(a)
        agn = {k: v for k, v in data.items() if k not in ("annotations", "categories")}
        agn["annotations"] = anns
        agn["categories"] = [{"id": 1, "name": "object", "supercategory": "object", "isthing": 1}]
        return load_coco(agn)

    def _things_gt(self):
        """The ground truth without its stuff categories (Hungarian mapping assigns thing categories only)."""
        data = self.gt.dataset
        things = [c for c in data.get("categories", []) if c.get("isthing", 1)]
        ids = {c["id"] for c in things}
        sub = {k: v for k, v in data.items() if k not in ("annotations", "categories")}
        sub["annotations"] = [a for a in data.get("annotations", []) if a.get("category_id") in ids]
        sub["categories"] = things
        return load_coco(sub)

    def reset(self) -> None:
        self.results = []

    def update(self, results: Iterable[dict]) -> None:
        """Add COCO results (dicts with ``segmentation`` RLE, ``score``, ``category_id``, image by id or name)."""
        for r in results:
            if "segmentation" not in r or "score" not in r:
                raise LabelwiseError("instance predictions need 'segmentation' and 'score' in every entry")
            self.results.append(r)

    def _evaluate(self, results: list[dict]) -> dict[str, float]:
        from pycocotools.cocoeval import COCOeval

        res = match_images(self.gt, results)
        _check_segmentations(self.gt, res, "prediction")
        out: dict[str, float] = {}
        if not res:
            out.update({k: 0.0 for k in SEGM_KEYS + BOX_KEYS})
            out["num_predictions"] = 0
            return out
        clean = []
        for r in res:
            q = {k: v for k, v in r.items() if k not in ("file_name", "level", "id")}
            if not self.class_aware:
                q["category_id"] = 1
            seg = q["segmentation"]
            if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
                q["segmentation"] = {"size": seg["size"], "counts": seg["counts"].decode("ascii")}
            clean.append(q)
        if self.hungarian:
            clean = self._hungarian_map(clean)
            out.update(hungarian_clusters_mapped=float(len({q["category_id"] for q in clean if q["category_id"] > 0})))
            clean = [q for q in clean if q["category_id"] > 0]
            if not clean:  # no cluster overlaps any object: nothing to score
                out.update({k: 0.0 for k in SEGM_KEYS + BOX_KEYS})
                out["num_predictions"] = 0
                return out
        elif self.class_aware:
            cats = {c["id"] for c in self.gt.dataset.get("categories", [])}
            bad = sorted({str(q.get("category_id")) for q in clean if q.get("category_id") not in cats})
            if bad:
                raise LabelwiseError(f"predictions use category ids {', '.join(bad[:5])} that the ground truth does "
                                     "not define; drop --class-aware or map the categories")
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self._gt_eval.loadRes(copy.deepcopy(clean))
            for iou_type, keys in (("segm", SEGM_KEYS), ("bbox", BOX_KEYS)):
                ev = COCOeval(self._gt_eval, dt, iou_type)
                ev.params.maxDets = [1, 10, self.max_dets]
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                for i, k in enumerate(keys):
                    v = float(ev.stats[i])
                    out[k] = v if v >= 0 else float("nan")
        out["num_predictions"] = len(clean)
        return out

    def _hungarian_map(self, results: list[dict]) -> list[dict]:
        """Cluster ids -> ground-truth thing categories (see the module doc); unmatched -> 0."""
        import numpy as np
        from pycocotools import mask as mask_utils

        from labelwise.blocks.matching import hungarian_match

        gt = self.gt
        things = sorted(c["id"] for c in gt.dataset.get("categories", []) if c.get("isthing", 1))
        col = {c: j for j, c in enumerate(things)}
        clusters = sorted({int(q["category_id"]) for q in results})
        row = {c: i for i, c in enumerate(clusters)}
        votes = np.zeros((len(clusters), len(things)))
        by_image: dict[Any, list[dict]] = {}
        for q in results:
            by_image.setdefault(q["image_id"], []).append(q)
        for iid, qs in by_image.items():
            anns = [a for a in gt.imgToAnns.get(iid, []) if a["category_id"] in col and not a.get("iscrowd", 0)]
            if not anns:
                continue
            g = [gt.annToRLE(a) for a in anns]
            d = [q["segmentation"] for q in qs]
            iou = np.asarray(mask_utils.iou(d, g, [0] * len(g))).reshape(len(d), len(g))
            best = iou.argmax(1)
            for k, q in enumerate(qs):
                if iou[k, best[k]] >= 0.5:
                    votes[row[int(q["category_id"])], col[anns[best[k]]["category_id"]]] += 1
        mapping = {}
        if votes.size:
            r, c = hungarian_match(votes, maximize=True)
            mapping = {clusters[i]: things[j] for i, j in zip(r.tolist(), c.tolist()) if votes[i, j] > 0}
        return [{**q, "category_id": mapping.get(int(q["category_id"]), 0)} for q in results]

    def compute(self) -> dict[str, Any]:
        gathered = all_gather_object(self.results)
        result = None
        if get_rank() == 0:
            allres = [r for part in gathered for r in part]
            result = self._evaluate(allres)
        return all_gather_object(result)[0]

    def table(self, result: dict[str, Any] | None = None) -> str:
        r = self.compute() if result is None else result
        mode = "Hungarian-mapped" if self.hungarian else "class-aware" if self.class_aware else "class-agnostic"
        return format_table([[k, r[k]] for k in SEGM_KEYS + BOX_KEYS if k in r], [f"metric ({mode})", "value"])
