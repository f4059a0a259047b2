"""Sharded, resumable pseudo-mask generation for a folder of images.

Layout while running (``OUT = FILE.json``)::

    FILE.json.parts/meta.json             method, backbone and resolved params of the run
    FILE.json.parts/shard-RANK.jsonl      one line per finished image (flushed per batch)

Under ``torchrun`` rank ``r`` of ``W`` processes ``images[r::W]``. Re-running skips every
image that already has a line in *any* shard file (so a run may resume with another
world size); a truncated last line (killed mid-write) is ignored and redone. At the end
rank 0 merges all shards into ``FILE.json`` (atomic; COCO results list ordered by file,
``image_id`` = 1-based index of the file in the sorted folder listing), writes unreadable
images with their reason to ``FILE.skipped.txt`` and removes the parts folder. With
``clusters=K`` the mask embeddings of each level are clustered (k-means) and
``category_id`` becomes the cluster id + 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from labelwise import dist
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json, atomic_write_text, list_images, read_image
from labelwise.pseudo.common import (FeatureExtractor, build_method, decode_embedding, kmeans, mask_records,
                                     upsample_masks)
from labelwise.utils import progress

__all__ = ["generate", "parts_dir", "skipped_path", "merge_parts"]


def parts_dir(out: Path) -> Path:
    return Path(str(out) + ".parts")


def skipped_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".skipped.txt")


def _read_done(pdir: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    for f in sorted(pdir.glob("shard-*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:     # truncated by a kill: redo that image
                    continue
                done[rec["file_name"]] = rec
    return done


def _open_append(path: Path):
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            needs_nl = fh.read(1) != b"\n"
        fh = open(path, "a", encoding="utf-8")
        if needs_nl:
            fh.write("\n")
        return fh
    return open(path, "a", encoding="utf-8")


def generate(method: str, images: str | Path, out: str | Path, *, backbone: str = "dino_vitb8",
             weights: str | None = None, resolution: int = 448, batch_size: int = 4, device: Any = "cpu",
             overrides: Sequence[str] = (), grid: int | None = None, clusters: int | None = None,
             levels: Sequence[str] = ("instance", "semantic"), keep_parts: bool = False,
             random_init: bool = False, seed: int = 0, extractor: FeatureExtractor | None = None) -> dict:
    """Generate pseudo-masks for every image below ``images`` into ``out`` (see module doc)."""
    images, out = Path(images), Path(out)
    files = list_images(images)
    if not files:
        raise LabelwiseError(f"{images}: no images found (looked for .jpg/.jpeg/.png/... recursively)")
    if out.suffix.lower() != ".json":
        raise LabelwiseError(f"--out {out}: give a .json file name for the COCO results")
    if batch_size < 1:
        raise LabelwiseError("--batch-size must be >= 1")
    run = build_method(method, overrides, backbone=backbone)   # validates --set before any heavy work
    if extractor is None:                                       # validates backbone / weights up front
        extractor = FeatureExtractor(backbone, weights, resolution, device, grid, random_init=random_init)
    rel = [p.relative_to(images).as_posix() for p in files]
    rank, world = dist.get_rank(), dist.get_world_size()
    pdir = parts_dir(out)
    meta = {"method": method, "backbone": backbone, "weights": str(weights) if weights else None,
            "resolution": resolution, "grid": grid, "levels": list(levels), "params": run.config}
    if dist.is_main():
        pdir.mkdir(parents=True, exist_ok=True)
        mpath = pdir / "meta.json"
        if mpath.exists():
            old = json.loads(mpath.read_text())
            if old != json.loads(json.dumps(meta)):
                raise LabelwiseError(f"{pdir}: unfinished results of a run with other settings; delete that folder "
                                     "or rerun with the same method, backbone and --set values")
        else:
            atomic_write_json(mpath, meta)
    dist.barrier()
    pdir.mkdir(parents=True, exist_ok=True)
    done = _read_done(pdir)
    todo = [i for i in range(rank, len(files), world) if rel[i] not in done]
    shard = pdir / f"shard-{rank:05d}.jsonl"
    if todo:
        with _open_append(shard) as fh:
            batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
            bar = progress(batches, desc=f"{method} pseudo-masks", total=len(batches))
            for batch in bar:
                imgs, ok, lines = [], [], []
                for i in batch:
                    try:
                        imgs.append(read_image(files[i]))
                        ok.append(i)
                    except LabelwiseError as e:
                        lines.append({"file_name": rel[i], "status": "skipped", "reason": str(e)})
                if ok:
                    keys = extractor(imgs)
                    results = run(keys)
                    for i, img, pm in zip(ok, imgs, results):
                        sel = [k for k, lv in enumerate(pm.levels) if lv in levels]
                        masks = upsample_masks(pm.masks[sel], img.shape[:2])
                        keep = None
                        post = getattr(run.impl, "postprocess", None)
                        if post is not None:
                            keep = post(img, masks)
                        sub = _subset(pm, sel)
                        lines.append({"file_name": rel[i], "status": "ok", "height": img.shape[0],
                                      "width": img.shape[1], "masks": mask_records(sub, masks, keep)})
                for rec in lines:
                    fh.write(json.dumps(rec) + "\n")
                fh.flush()                                     # a finished batch survives a kill
                os.fsync(fh.fileno())
    dist.barrier()
    summary = {}
    if dist.is_main():
        summary = merge_parts(out, rel, clusters=clusters, seed=seed)
        if not keep_parts:
            shutil.rmtree(pdir, ignore_errors=True)
    dist.barrier()
    return summary


def _subset(pm, sel: list[int]):
    from labelwise.pseudo.common import PseudoMasks

    idx = torch.tensor(sel, dtype=torch.long)
    return PseudoMasks(masks=pm.masks[idx], scores=pm.scores[idx], levels=[pm.levels[k] for k in sel],
                       layers=pm.layers[idx], embeddings=pm.embeddings[idx])


def merge_parts(out: Path, rel: list[str], clusters: int | None = None, seed: int = 0) -> dict:
    """Merge shard files into the COCO results json (+ skipped report). Returns a summary."""
    out = Path(out)
    done = _read_done(parts_dir(out))
    results, skipped, n_img = [], [], 0
    for image_id, name in enumerate(rel, start=1):
        rec = done.get(name)
        if rec is None:
            skipped.append(f"{name}\tnot processed (missing from the shard files)")
            continue
        if rec["status"] != "ok":
            skipped.append(f"{name}\t{rec.get('reason', 'unreadable')}")
            continue
        n_img += 1
        for m in rec["masks"]:
            results.append({"image_id": image_id, "file_name": name, **m})
    if clusters:
        for level in ("instance", "semantic"):
            idx = [k for k, r in enumerate(results) if r["level"] == level]
            if not idx:
                continue
            emb = torch.from_numpy(np.stack([decode_embedding(results[k]["embedding"]) for k in idx]))
            labels, _ = kmeans(emb, clusters, seed=seed)
            for k, lab in zip(idx, labels.tolist()):
                results[k]["category_id"] = int(lab) + 1
    for i, r in enumerate(results, start=1):
        r.pop("embedding", None)
        r["id"] = i
    atomic_write_json(out, results, indent=None)
    sp = skipped_path(out)
    if skipped:
        atomic_write_text(sp, "\n".join(skipped) + "\n")
    elif sp.exists():
        sp.unlink()
    return {"images": n_img, "masks": len(results), "skipped": len(skipped), "out": str(out),
            "skipped_report": str(sp) if skipped else None}


def write_cluster_maps(out: str | Path, images: str | Path, maps_dir: str | Path, level: str = "semantic") -> int:
    """Paint the clustered masks of ``level`` (ascending score, best on top) into
    ``maps_dir/<file stem>.png`` cluster-id maps (0..K-1, 255 = none). Returns the count."""
    from labelwise.io import write_label
    from labelwise.masks import decode_mask

    results = json.loads(Path(out).read_text())
    by_file: dict[str, list[dict]] = {}
    for r in results:
        if r["level"] == level:
            by_file.setdefault(r["file_name"], []).append(r)
    files = [p.relative_to(images).as_posix() for p in list_images(images)]
    maps_dir = Path(maps_dir)
    n = 0
    for name in files:
        recs = sorted(by_file.get(name, []), key=lambda r: r["score"])
        if not recs:
            continue
        h, w = recs[0]["segmentation"]["size"]
        lab = np.full((h, w), 255, dtype=np.uint8)
        for r in recs:                                 # a few dozen masks per image
            lab[decode_mask(r["segmentation"]).astype(bool)] = min(int(r["category_id"]) - 1, 254)
        write_label(maps_dir / (Path(name).with_suffix("").as_posix() + ".png"), lab)
        n += 1
    return n
