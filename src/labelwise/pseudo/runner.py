"""Pseudo-masks for a folder of images (or any dataset split), through the inference engine.

``generate(method, images, out, ...)`` / ``generate_from_spec(method, spec, split, out, ...)``
run :func:`labelwise.engine.predict.run_predict` with the ``coco_rle`` writer
(:class:`labelwise.engine.writers.CocoRLEWriter`). While running (``OUT = FILE.json``)::

    FILE.json.parts/meta.json             method, backbone and resolved settings of the run
    FILE.json.parts/shard-RANK.jsonl      one line per finished image (flushed per batch)

Under ``torchrun`` rank ``r`` of ``W`` processes images ``r, r + W, ...``. Re-running skips
every image that already has a line in *any* shard file (so a run may resume with another
world size); a line torn by a kill is ignored and redone. At the end rank 0 merges the
shards into ``FILE.json`` (atomic; COCO results ordered by file, ``image_id`` = 1-based
position of the image in the dataset, i.e. in the sorted folder listing), lists unreadable
images with their reason in ``FILE.skipped.txt`` and removes the parts folder. With
``cluster.k = K`` the mask embeddings of each level are clustered (k-means) and
``category_id`` becomes the cluster id + 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from labelwise.config import to_dict
from labelwise.errors import LabelwiseError
from labelwise.io import list_images
from labelwise.pseudo.common import (FeatureExtractor, PseudoMaskConfig, build_method, decode_embedding, kmeans,
                                     mask_records, resolve_pseudo_config, upsample_masks)

__all__ = ["generate", "generate_from_spec", "run_pseudo_masks", "image_records", "parts_dir", "skipped_path",
           "write_cluster_maps"]


def parts_dir(out: Path) -> Path:
    return Path(str(out) + ".parts")


def skipped_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".skipped.txt")


def _flags(backbone=None, weights=None, resolution=None, grid=None, batch_size=None, clusters=None,
           levels=None, random_init=None, seed=None) -> dict:
    """Command-line flags as a config layer (only those given)."""
    feats = {k: v for k, v in dict(backbone=backbone, weights=weights, resolution=resolution, grid=grid,
                                   batch_size=batch_size, random_init=random_init).items() if v is not None}
    out: dict[str, Any] = {"features": feats} if feats else {}
    cl = {k: v for k, v in dict(k=clusters, seed=seed).items() if v is not None}
    if cl:
        out["cluster"] = cl
    if levels is not None:
        out["levels"] = list(levels)
    return out


def generate(method: str, images: str | Path, out: str | Path, *, overrides: Sequence[str] = (),
             device: Any = "cpu", keep_parts: bool = False, extractor: FeatureExtractor | None = None,
             show_progress: bool = True, **flags) -> dict:
    """Pseudo-masks for every image below the folder ``images`` into ``out`` (see module doc).

    ``flags``: ``backbone``, ``weights``, ``resolution``, ``grid``, ``batch_size``, ``clusters``,
    ``levels``, ``random_init``, ``seed`` (the command-line flags); ``overrides`` are dotted
    ``--set`` keys of :class:`~labelwise.pseudo.common.PseudoMaskConfig`.
    """
    images = Path(images)
    if not images.is_dir():
        list_images(images)  # the one-line "folder not found" error
    return generate_from_spec(method, f"folder:{images}", None, out, overrides=overrides, device=device,
                              keep_parts=keep_parts, extractor=extractor, show_progress=show_progress, **flags)


def generate_from_spec(method: str, spec: str, split: str | None, out: str | Path, *,
                       overrides: Sequence[str] = (), device: Any = "cpu", keep_parts: bool = False,
                       extractor: FeatureExtractor | None = None, show_progress: bool = True, **flags) -> dict:
    """Pseudo-masks for split ``split`` of dataset ``spec`` (``FORMAT:PATH``) into ``out``."""
    cfg = resolve_pseudo_config(method, overrides, _flags(**flags))
    return run_pseudo_masks(method, spec, split, out, cfg, device=device, keep_parts=keep_parts,
                            extractor=extractor, show_progress=show_progress)


def run_pseudo_masks(method: str, spec: str, split: str | None, out: str | Path, cfg: PseudoMaskConfig, *,
                     device: Any = "cpu", keep_parts: bool = False, extractor: FeatureExtractor | None = None,
                     show_progress: bool = True) -> dict:
    from labelwise.data import build_dataset
    from labelwise.engine.api import normalise_spec
    from labelwise.engine.predict import run_predict
    from labelwise.engine.writers import CocoRLEWriter
    from labelwise.utils import resolve_device

    out = Path(out)
    if out.suffix.lower() != ".json":
        raise LabelwiseError(f"--out {out}: give a .json file name for the COCO results")
    run = build_method(method, cfg)                               # validates settings before heavy work
    ds = build_dataset(spec, split)
    fc = cfg.features
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if extractor is None:                                          # validates backbone / weights up front
        extractor = FeatureExtractor(fc.backbone, fc.weights, fc.resolution, device, fc.grid,
                                     random_init=fc.random_init)
    levels = tuple(cfg.levels)
    # what decides the masks (not batch size or workers: a run resumed at a smaller batch is the same run)
    features = {k: v for k, v in to_dict(fc).items() if k not in ("batch_size", "num_workers")}
    meta = {"method": method, "data": normalise_spec(spec), "split": split, "features": features,
            "levels": list(levels), "params": run.config}
    merge = _cluster_merge(cfg.cluster.k, cfg.cluster.seed) if cfg.cluster.k else _drop_embeddings
    writer = CocoRLEWriter(out, meta=meta, merge=merge, keep_parts=keep_parts)
    post = getattr(run.impl, "postprocess", None)

    def predict(batch: dict) -> list[dict]:
        results = run(extractor.features(batch["inputs"]))
        payloads = []
        for item, pm in zip(batch["items"], results):
            payloads.append({"masks": image_records(pm, item["image"], levels, post)})
        return payloads

    summary = run_predict(predict, ds, {"masks": writer}, transform=_Resize(extractor.resolution),
                          batch_size=fc.batch_size, num_workers=fc.num_workers, device=extractor.device,
                          skip_bad=True, show_progress=show_progress, desc=f"{method} pseudo-masks")
    return summary["writers"]["masks"]


def image_records(pm, image: np.ndarray, levels: Sequence[str], post=None) -> list[dict]:
    """One image's token masks -> its COCO-RLE records, as ``pseudo-masks`` writes them: the masks of
    ``levels``, upsampled to the image size (:func:`upsample_masks`), post-processed by ``post(image,
    masks) -> keep`` (the method's ``postprocess``: MaskCut's CRF / hole filling; None: none) and encoded
    (:func:`mask_records`). ``labelwise bench oap`` times this same call."""
    sel = [k for k, lv in enumerate(pm.levels) if lv in levels]
    masks = upsample_masks(pm.masks[sel], image.shape[:2])
    keep = post(image, masks) if post is not None else None
    return mask_records(_subset(pm, sel), masks, keep)


class _Resize:
    """DataLoader-side: the image as a ``3 x r x r`` float tensor in [0, 1] (``input``)."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, item: dict) -> dict:
        import torch.nn.functional as Fn

        x = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float().div(255.0)[None]
        r = self.resolution
        x = Fn.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)[0]
        return {"image": item["image"], "image_id": item["image_id"], "file_name": item["file_name"], "input": x}


def _subset(pm, sel: list[int]):
    from labelwise.pseudo.common import PseudoMasks

    idx = torch.tensor(sel, dtype=torch.long)
    return PseudoMasks(masks=pm.masks[idx], scores=pm.scores[idx], levels=[pm.levels[k] for k in sel],
                       layers=pm.layers[idx], embeddings=pm.embeddings[idx])


def _drop_embeddings(results: list[dict]) -> list[dict]:
    for r in results:
        r.pop("embedding", None)
    return results


def _cluster_merge(k: int, seed: int):
    def merge(results: list[dict]) -> list[dict]:
        for level in ("instance", "semantic"):
            idx = [i for i, r in enumerate(results) if r["level"] == level]
            if not idx:
                continue
            emb = torch.from_numpy(np.stack([decode_embedding(results[i]["embedding"]) for i in idx]))
            labels, _ = kmeans(emb, k, seed=seed)
            for i, lab in zip(idx, labels.tolist()):
                results[i]["category_id"] = int(lab) + 1
        return _drop_embeddings(results)
    return merge


def write_cluster_maps(out: str | Path, images: str | Path, maps_dir: str | Path, level: str = "semantic") -> int:
    """Paint the clustered masks of ``level`` (ascending score, best on top) into
    ``maps_dir/<file stem>.png`` cluster-id maps (0..K-1; 255 = none, or a 16-bit PNG with
    65535 = none for more than 255 clusters); every image of the folder gets a map (all none when
    it has no mask), so ``evaluate unsupervised`` sees them all. Returns the number of maps written."""
    from labelwise.io import read_image, write_cluster_map
    from labelwise.masks import decode_mask

    results = json.loads(Path(out).read_text())
    by_file: dict[str, list[dict]] = {}
    for r in results:
        if r["level"] == level:
            by_file.setdefault(r["file_name"], []).append(r)
    images = Path(images)
    maps_dir = Path(maps_dir)
    # 8-bit maps (255 = none) up to 255 clusters, 16-bit above (labelwise.io.write_cluster_map)
    num_clusters = max([int(r["category_id"]) for r in results] + [1])
    n = 0
    for path in list_images(images):
        name = path.relative_to(images).as_posix()
        recs = sorted(by_file.get(name, []), key=lambda r: r["score"])
        if recs:
            h, w = recs[0]["segmentation"]["size"]
        else:
            try:
                h, w = read_image(path).shape[:2]
            except LabelwiseError:
                continue  # unreadable: listed in FILE.skipped.txt
        lab = np.full((h, w), -1, dtype=np.int64)
        for r in recs:                                 # a few dozen masks per image
            lab[decode_mask(r["segmentation"]).astype(bool)] = int(r["category_id"]) - 1
        write_cluster_map(maps_dir / (Path(name).with_suffix("").as_posix() + ".png"), lab, num_clusters)
        n += 1
    return n
