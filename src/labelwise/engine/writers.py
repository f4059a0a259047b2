"""One writer per output kind of the inference engine (:mod:`labelwise.engine.predict`).

Each writer knows where an image's output goes, whether it is already there (so an
interrupted pass resumes), how to write it atomically, and what to do once every rank
has finished (``finish``, called on every rank after a barrier).

============  ==============================================  ======================================
kind          files                                           payload of ``write``
============  ==============================================  ======================================
label_png     ``OUT/<image_id>.png`` (VOC palette, uint8)     ``H x W`` class indices, 255 = ignore
cam_npz       ``OUT/<image_id>.npz``: ``cams`` float16        ``{"cams": K x H x W, "keys": K}``
              K x H x W, ``keys`` class indices
parts_png     ``OUT/parts/<image_id>.png`` and                ``{"parts": H x W, "objects": H x W}``
              ``OUT/objects/<image_id>.png``
coco_rle      ``JSON`` (COCO results list) merged from        list of result dicts (``segmentation``
              ``JSON.parts/shard-RANK.jsonl``                 RLE, ``score``, ``category_id``, ...)
universal     ``OUT/universal.json`` (as coco_rle, with          ``{"masks": [records], "clusters":
              ``level``) and ``OUT/clusters/<image_id>.png``  H x W cluster ids}``
clustered_    ``OUT/<name>.json``, categories set at the      list of records (e.g. each with
masks         merge by the method's ``merge`` (k-means),      an ``embedding`` to cluster)
              and ``OUT/<name>_clusters/<image_id>.png``
============  ==============================================  ======================================

``image_id`` may contain ``/`` (images in sub-folders of a ``folder:`` dataset); the
sub-folders are created. The ``coco_rle`` writer keys images by ``file_name`` and gives
each record ``image_id`` = the 1-based position of its image in the dataset, so results
of any world size merge into the same file; unreadable images are listed in
``JSON.skipped.txt`` (``file<TAB>reason``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from labelwise import dist
from labelwise.io import atomic_save_npz, atomic_write_json, atomic_write_text, write_cluster_map, write_label

__all__ = ["Writer", "LabelPNGWriter", "CamNpzWriter", "PartsPNGWriter", "CocoRLEWriter", "UniversalWriter", "ClusteredMasksWriter", "WRITERS", "make_writer"]


class Writer:
    """Base class: ``prepare()``, ``done(item_key)``, ``write(item, payload)``, ``skip(item, reason)``,
    ``flush()``, ``finish(keys)``, ``close()``."""

    key = "image_id"  # which item field identifies an image for this writer

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def prepare(self) -> None:
        """Called on every rank before the pass (collective)."""

    def files(self, image_id: str) -> list[Path]:
        raise NotImplementedError

    def done(self, key: str) -> bool:
        return all(p.is_file() for p in self.files(key))

    def write(self, item: dict, payload: Any) -> None:
        raise NotImplementedError

    def skip(self, item: dict, reason: str) -> None:
        """An unreadable image (``skip_bad``); file writers leave it to the engine's skipped list."""

    def flush(self) -> None:
        """Make what was written so far survive a kill (called after every batch)."""

    def finish(self, keys: list[str]) -> dict:
        """Called on every rank once all ranks are done; ``keys`` are all the dataset's image keys."""
        return {}

    def close(self) -> None:
        pass


class LabelPNGWriter(Writer):
    def files(self, image_id: str) -> list[Path]:
        return [self.out / f"{image_id}.png"]

    def write(self, item: dict, payload: np.ndarray) -> None:
        write_label(self.out / f"{item['image_id']}.png", np.asarray(payload))


class CamNpzWriter(Writer):
    #: optional per-image diagnostics stored beside the maps (read by people, ignored by readers)
    DIAGNOSTICS = ("walk_exp_times", "boundary_quantiles")

    def files(self, image_id: str) -> list[Path]:
        return [self.out / f"{image_id}.npz"]

    def write(self, item: dict, payload: dict) -> None:
        cams = np.asarray(payload["cams"], dtype=np.float16)
        keys = np.asarray(payload["keys"], dtype=np.int64).reshape(-1)
        if cams.ndim != 3 or cams.shape[0] != len(keys):
            raise ValueError(f"seeds of {item['image_id']}: cams {cams.shape} do not match {len(keys)} keys")
        extra = {}
        if payload.get("bg_threshold") is not None:  # the seed's own background threshold (CoBra)
            extra["bg_threshold"] = np.float32(payload["bg_threshold"])
        for k in self.DIAGNOSTICS:  # per-image numbers a method reports with its maps (IRN's walk)
            if payload.get(k) is not None:
                extra[k] = np.asarray(payload[k], dtype=np.float32)
        atomic_save_npz(self.out / f"{item['image_id']}.npz", cams=cams, keys=keys, **extra)


class PartsPNGWriter(Writer):
    def files(self, image_id: str) -> list[Path]:
        return [self.out / "parts" / f"{image_id}.png", self.out / "objects" / f"{image_id}.png"]

    def write(self, item: dict, payload: dict) -> None:
        write_label(self.out / "objects" / f"{item['image_id']}.png", np.asarray(payload["objects"]))
        write_label(self.out / "parts" / f"{item['image_id']}.png", np.asarray(payload["parts"]))


class CocoRLEWriter(Writer):
    """COCO results json merged from per-rank JSONL shards (one line per finished image).

    ``merge(results) -> results`` (optional) post-processes the merged list before it is
    written (e.g. k-means of mask embeddings into pseudo classes). ``meta`` (a JSON-able
    dict) is stored beside the shards; resuming with different ``meta`` is refused.
    """

    key = "file_name"

    def __init__(self, out: str | Path, *, meta: dict | None = None,
                 merge: Callable[[list[dict]], list[dict]] | None = None, keep_parts: bool = False):
        super().__init__(out)
        self.parts = Path(str(self.out) + ".parts")
        self.meta, self.merge, self.keep_parts = meta, merge, keep_parts
        self._done: dict[str, dict] | None = None
        self._fh = None

    @property
    def skipped_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".skipped.txt")

    def prepare(self) -> None:
        """Create the parts folder and check its settings (rank 0), then read what is done."""
        from labelwise.errors import LabelwiseError

        clash = False
        if dist.is_main():
            self.parts.mkdir(parents=True, exist_ok=True)
            mpath = self.parts / "meta.json"
            meta = json.loads(json.dumps(self.meta)) if self.meta is not None else None
            if mpath.exists():
                clash = json.loads(mpath.read_text()) != meta
            else:
                atomic_write_json(mpath, meta)
        if dist.all_gather_object(clash)[0]:  # every rank stops, not only rank 0
            raise LabelwiseError(f"{self.parts}: unfinished results of a run with other settings; delete that "
                                 "folder or rerun with the same settings")
        self._done = read_shards(self.parts)

    def done(self, key: str) -> bool:
        return key in self._done  # type: ignore[operator]

    def _handle(self):
        if self._fh is None:
            self.parts.mkdir(parents=True, exist_ok=True)
            self._fh = open_append(self.parts / f"shard-{dist.get_rank():05d}.jsonl")
        return self._fh

    def write(self, item: dict, payload: list[dict]) -> None:
        img = item["image"]
        self._handle().write(json.dumps({"file_name": item["file_name"], "status": "ok", "height": int(img.shape[0]),
                                         "width": int(img.shape[1]), "masks": list(payload)}) + "\n")

    def skip(self, item: dict, reason: str) -> None:
        self._handle().write(json.dumps({"file_name": item["file_name"], "status": "skipped",
                                         "reason": reason}) + "\n")

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self, keys: list[str]) -> dict:
        self.close()
        summary: dict = {}
        if dist.is_main():
            summary = self._merge(keys)
            if not self.keep_parts:
                shutil.rmtree(self.parts, ignore_errors=True)
        dist.barrier()
        return summary

    def _merge(self, keys: list[str]) -> dict:
        done = read_shards(self.parts)
        results, skipped, n_img = [], [], 0
        for image_id, name in enumerate(keys, start=1):
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
        if self.merge is not None:
            results = self.merge(results)
        for i, r in enumerate(results, start=1):
            r["id"] = i
        atomic_write_json(self.out, results, indent=None)
        sp = self.skipped_path
        if skipped:
            atomic_write_text(sp, "\n".join(skipped) + "\n")
        elif sp.exists():
            sp.unlink()
        return {"images": n_img, "masks": len(results), "skipped": len(skipped), "out": str(self.out),
                "skipped_report": str(sp) if skipped else None}


def read_shards(parts: Path) -> dict[str, dict]:
    """``file_name -> record`` from every ``shard-*.jsonl`` (a line torn by a kill is ignored: redone)."""
    done: dict[str, dict] = {}
    for f in sorted(Path(parts).glob("shard-*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[rec["file_name"]] = rec
    return done


def open_append(path: Path):
    """Open ``path`` for appending, first ending a torn last line so new records start clean."""
    needs_nl = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            needs_nl = fh.read(1) != b"\n"
    fh = open(path, "a", encoding="utf-8")
    if needs_nl:
        fh.write("\n")
    return fh


class UniversalWriter(CocoRLEWriter):
    """Universal segmentation (OAP): ``OUT/universal.json`` (COCO RLE results with ``level``
    instance / semantic and ``category_id`` = cluster id + 1) merged from shards as
    :class:`CocoRLEWriter`, plus ``OUT/clusters/<image_id>.png`` cluster-id maps
    (:func:`labelwise.io.write_cluster_map`: 8-bit with 255 = no mask, or 16-bit with 65535 = no
    mask when K > 255). Payload: ``{"masks": [records], "clusters": H x W ids (-1 = none),
    "num_clusters": K}``."""

    def __init__(self, out: str | Path, **kw):
        self.maps = Path(out) / "clusters"
        super().__init__(Path(out) / "universal.json", **kw)

    def write(self, item: dict, payload: dict) -> None:
        self.maps.mkdir(parents=True, exist_ok=True)
        write_cluster_map(self.maps / f"{item['image_id']}.png", np.asarray(payload["clusters"]),
                          int(payload["num_clusters"]))
        super().write(item, payload["masks"])


class ClusteredMasksWriter(CocoRLEWriter):
    """Masks whose categories are found once every image is done: ``OUT/<name>.json`` (COCO RLE
    results with ``level``) whose ``merge`` (given by the method, e.g. k-means of each record's
    ``embedding`` into ``clusters`` = K groups, ``category_id`` = cluster + 1) runs once all
    ranks are done, plus ``OUT/<name>_clusters/<image_id>.png``
    cluster-id maps of the semantic-level masks painted in ascending score
    (:func:`labelwise.io.write_cluster_map`). Payload: a
    list of records, as :class:`CocoRLEWriter`."""

    def __init__(self, out: str | Path, *, merge: Callable[[list[dict]], list[dict]], clusters: int,
                 name: str = "pseudo", **kw):
        self.maps = Path(out) / f"{name}_clusters"
        self.num_clusters = int(clusters)
        super().__init__(Path(out) / f"{name}.json", merge=merge, **kw)

    def write(self, item: dict, payload: list[dict]) -> None:
        img = item["image"]  # as CocoRLEWriter, plus the dataset's image_id that names the map
        self._handle().write(json.dumps({"file_name": item["file_name"], "image_key": item["image_id"],
                                         "status": "ok", "height": int(img.shape[0]), "width": int(img.shape[1]),
                                         "masks": list(payload)}) + "\n")

    def _merge(self, keys: list[str]) -> dict:
        from labelwise.masks import decode_mask

        shards = {k: r for k, r in read_shards(self.parts).items() if r.get("status") == "ok"}
        summary = super()._merge(keys)
        by_file: dict[str, list[dict]] = {}
        for r in json.loads(self.out.read_text()):
            if r.get("level") == "semantic":
                by_file.setdefault(r["file_name"], []).append(r)
        for name, rec in shards.items():
            h, w = int(rec["height"]), int(rec["width"])
            lab = np.full((h, w), -1, dtype=np.int64)
            for r in sorted(by_file.get(name, []), key=lambda r: r["score"]):  # best on top
                lab[decode_mask(r["segmentation"], h, w)] = int(r["category_id"]) - 1
            path = self.maps / f"{rec['image_key']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_cluster_map(path, lab, self.num_clusters)
        summary["maps"] = str(self.maps)
        return summary


WRITERS: dict[str, type[Writer]] = {
    "label_png": LabelPNGWriter,
    "cam_npz": CamNpzWriter,
    "parts_png": PartsPNGWriter,
    "coco_rle": CocoRLEWriter,
    "universal": UniversalWriter,
    "clustered_masks": ClusteredMasksWriter,
}


def make_writer(kind: str, out: str | Path, **kw) -> Writer:
    if kind not in WRITERS:
        raise ValueError(f"unknown writer kind {kind!r}; one of {', '.join(WRITERS)}")
    return WRITERS[kind](out, **kw)
