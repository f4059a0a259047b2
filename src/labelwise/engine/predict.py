"""The inference engine: one predict loop for every method and pseudo-mask generator.

``run_predict(predict_fn, dataset, writers, ...)``:

* rank sharding: rank ``r`` of ``W`` takes items ``r, r + W, ...`` of the dataset;
* resume: an item is skipped when every writer already has its output (``Writer.done``),
  so re-running an interrupted pass only computes what is missing;
* a DataLoader decodes images (and runs ``transform``, e.g. resizing, in its workers);
  consecutive items whose ``input`` tensors have one shape are stacked into a batch of up
  to ``batch_size`` and handed to ``predict_fn(batch) -> [{what: payload}, ...]``; the
  main process only runs the model and the writers;
* ``skip_bad``: an unreadable item is recorded (``OUT/skipped.txt`` for file outputs, the
  writer's own list for ``coco_rle``) instead of stopping the pass;
* a progress bar on rank 0; at the end, a barrier and every writer's ``finish`` (the
  ``coco_rle`` shards are merged there).

``batch`` is ``{"inputs": B x 3 x H x W on the device, "items": [item dicts]}``; items keep
the dataset's fields (``image_id``, ``file_name``, ``image`` as uint8 H x W x 3, ``tags``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from labelwise import dist
from labelwise.engine.writers import Writer
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_text
from labelwise.utils import progress

__all__ = ["run_predict", "item_key"]


def item_key(dataset, index: int, key: str) -> str:
    """``image_id`` or ``file_name`` of item ``index`` without decoding it."""
    if key == "file_name":
        fn = getattr(dataset, "file_name", None)
        if fn is not None:
            return fn(index)
        return Path(dataset.image_path(index)).name
    return dataset.ids[index]


class _Items(Dataset):
    """``dataset[indices[j]]`` through ``transform``; with ``skip_bad`` a bad item becomes a skip record."""

    def __init__(self, dataset, indices: list[int], transform: Callable[[dict], dict] | None, skip_bad: bool):
        self.dataset, self.indices, self.transform, self.skip_bad = dataset, indices, transform, skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        try:
            item = self.dataset[i]
            return self.transform(item) if self.transform is not None else item
        except LabelwiseError as e:
            if not self.skip_bad:
                raise
            return {"_skipped": str(e), "image_id": self.dataset.ids[i],
                    "file_name": item_key(self.dataset, i, "file_name")}


def _worker_init(worker_id: int) -> None:
    from labelwise.engine.data import die_with_parent

    die_with_parent()  # a killed `labelwise infer` leaves no decoding workers behind


def _identity(x):
    return x


def same_size_batches(items: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Consecutive items whose ``input`` tensors share one shape, in groups of at most ``batch_size``
    (inputs of different sizes cannot be stacked); the order is kept."""
    group: list[dict] = []
    for item in items:
        if group and (item["input"].shape != group[0]["input"].shape or len(group) >= batch_size):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def run_predict(predict_fn: Callable[[dict], list[dict[str, Any]]], dataset, writers: dict[str, Writer], *,
                transform: Callable[[dict], dict] | None = None, batch_size: int = 1, num_workers: int = 0,
                device: torch.device | str = "cpu", skip_bad: bool = False, show_progress: bool = True,
                desc: str = "predict") -> dict:
    """Run ``predict_fn`` over ``dataset`` and write each ``what`` with ``writers[what]`` (see module doc).

    Returns ``{"images": processed on this rank, "skipped": [...], "writers": {what: finish summary},
    "predicted": images predicted by all ranks, "present": images whose outputs were already there}``.
    """
    if batch_size < 1:
        raise LabelwiseError(f"batch size must be >= 1, got {batch_size}")
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    for writer in writers.values():
        writer.prepare()
    mine = list(range(rank, len(dataset), world))
    todo = [i for i in mine if not all(w.done(item_key(dataset, i, w.key)) for w in writers.values())]
    loader = DataLoader(_Items(dataset, todo, transform, skip_bad), batch_size=None, shuffle=False,
                        num_workers=num_workers, collate_fn=_identity,
                        worker_init_fn=_worker_init if num_workers else None,
                        persistent_workers=False, prefetch_factor=4 if num_workers else None)
    skipped: list[tuple[str, str]] = []
    bar = progress(range(len(todo)), desc=desc, total=len(todo)) if show_progress else None

    def run(group: list[dict]) -> None:
        inputs = torch.stack([it["input"] for it in group]).to(device, non_blocking=True)
        outs = predict_fn({"inputs": inputs, "items": group})
        if len(outs) != len(group):
            raise RuntimeError(f"predict returned {len(outs)} outputs for {len(group)} images")
        for item, out in zip(group, outs):
            for what, writer in writers.items():
                writer.write(item, out[what])
        for writer in writers.values():
            writer.flush()
        if bar is not None:
            bar.update(len(group))

    def predictable() -> Iterator[dict]:
        for item in loader:
            if "_skipped" in item:
                skipped.append((item["file_name"], item["_skipped"]))
                for writer in writers.values():
                    writer.skip(item, item["_skipped"])
                if bar is not None:
                    bar.update(1)
                continue
            yield item

    try:
        with torch.inference_mode():
            for group in same_size_batches(predictable(), batch_size):
                run(group)
    finally:
        for writer in writers.values():
            writer.close()
        if bar is not None:
            bar.close()
    all_skipped = [s for part in dist.all_gather_object(skipped) for s in part]
    dist.barrier()
    keys_by_kind = {k: [item_key(dataset, i, k) for i in range(len(dataset))]
                    for k in {w.key for w in writers.values()}}
    summaries = {what: w.finish(keys_by_kind[w.key]) for what, w in writers.items()}
    file_outs = {w.out for w in writers.values() if w.key == "image_id"}
    if dist.is_main():
        for out in file_outs:
            path = Path(out) / "skipped.txt"
            if all_skipped:
                atomic_write_text(path, "".join(f"{f}\t{r}\n" for f, r in all_skipped))
            elif path.exists():
                path.unlink()
    counts = dist.all_gather_object((len(todo) - len(skipped), len(mine) - len(todo)))
    return {"images": len(todo) - len(skipped), "skipped": all_skipped, "writers": summaries,
            "predicted": sum(c[0] for c in counts), "present": sum(c[1] for c in counts)}
