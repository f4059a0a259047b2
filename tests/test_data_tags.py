"""Derived tags: vectorised derivation, caching and invalidation, cache location fallback."""

from __future__ import annotations

import os
from pathlib import Path
import time

import numpy as np
import pytest

from labelwise.data import build_dataset
from labelwise.data import tags as tags_mod
from labelwise.io import write_image, write_label


def make_voc(root, labels):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = [f"i{k}" for k in range(len(labels))]
    for i, lab in zip(ids, labels):
        write_image(root / "JPEGImages" / f"{i}.jpg", np.zeros((*lab.shape, 3), np.uint8))
        write_label(root / "SegmentationClass" / f"{i}.png", lab)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids))
    return root


def lab(*classes):
    m = np.zeros((8, 8), np.uint8)
    for j, c in enumerate(classes):
        m[j, :] = c
    return m


def test_tags_from_label_ignores_background_and_ignore():
    t = tags_mod.tags_from_label(np.array([[0, 3, 255], [3, 20, 0]], np.uint8), 21)
    assert t.shape == (20,) and t.dtype == np.float32
    assert np.flatnonzero(t).tolist() == [2, 19]


def test_derived_tags_cached_and_invalidated(tmp_path, monkeypatch):
    root = make_voc(tmp_path / "voc", [lab(1, 2), lab(5), lab(255)])
    ds = build_dataset(f"voc:{root}", "train")
    assert ds.tags(0).tolist()[:5] == [1, 1, 0, 0, 0] and ds.tags(2).sum() == 0
    cache = tags_mod.cache_dir(root) / "tags-voc-train.npz"
    assert cache.is_file() and not (root / ".labelwise_cache").exists()  # the dataset is left alone
    # second dataset: served from cache, no label decoding
    calls = []
    ds2 = build_dataset(f"voc:{root}", "train")
    monkeypatch.setattr(type(ds2), "load_mask", lambda self, i: calls.append(i))
    assert ds2.tags(1)[4] == 1 and calls == []
    monkeypatch.undo()
    # label changes -> recomputed
    time.sleep(0.01)
    write_label(root / "SegmentationClass" / "i1.png", lab(7, 7, 7))
    st = (root / "SegmentationClass" / "i1.png").stat()
    os.utime(root / "SegmentationClass" / "i1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds3 = build_dataset(f"voc:{root}", "train")
    assert np.flatnonzero(ds3.tags(1)).tolist() == [6]
    # split list changes -> recomputed with the new order
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("i2\ni0\n")
    ds4 = build_dataset(f"voc:{root}", "train")
    assert ds4.tags(0).sum() == 0 and ds4.tags(1)[:2].tolist() == [1, 1]


def test_cache_lives_under_labelwise_cache_and_read_only_datasets_work(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELWISE_CACHE", str(tmp_path / "cache"))
    root = make_voc(tmp_path / "voc", [lab(1, 2), lab(5)])
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    try:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)  # a read-only, shared dataset
        ds = build_dataset(f"voc:{root}", "train")
        assert ds.tags(0).tolist()[:2] == [1, 1]
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    d = tags_mod.cache_dir(root)
    assert d.parent == tmp_path / "cache" / "tags" and (d / "tags-voc-train.npz").is_file()
    assert tags_mod.cache_dir(root) == d == tags_mod.cache_dir(tmp_path / "voc" / ".." / "voc")  # stable per root
    monkeypatch.delenv("LABELWISE_CACHE")
    assert tags_mod.cache_root() == Path.home() / ".cache" / "labelwise"


def test_names_to_tags_errors():
    names = ["background", "cat", "dog"]
    assert tags_mod.names_to_tags(["Dog", "1"], names, "f:1").tolist() == [1, 1]
    with pytest.raises(Exception, match=r"f:3: unknown class name 'dgo'; did you mean 'dog'"):
        tags_mod.names_to_tags(["dgo"], names, "f:3")
    with pytest.raises(Exception, match=r"class index 3 out of range"):
        tags_mod.names_to_tags(["3"], names, "f:1")
