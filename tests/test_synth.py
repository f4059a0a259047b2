"""Synthetic testbeds: determinism, layout conformity and the statistics they promise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from labelwise.data import synth
from labelwise.data.synth import cooc, draw, objects, parts
from labelwise.errors import LabelwiseError
from labelwise.io import read_image, read_label


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def cooc_dir(tmp_path_factory):
    return synth.generate("cooc", tmp_path_factory.mktemp("cooc"), n_train=200, n_val=10, size=64, seed=3)


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory):
    return synth.generate("parts", tmp_path_factory.mktemp("parts"), n_train=40, n_val=5, size=96, seed=1)


@pytest.fixture(scope="module")
def objects_dir(tmp_path_factory):
    return synth.generate("objects", tmp_path_factory.mktemp("objects"), n_train=60, n_val=5, size=96, seed=2)


def _cooc_records(root: Path, split: str = "train"):
    ctx = dict(line.split() for line in (root / "contexts.txt").read_text().splitlines())
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    out = []
    for i in ids:
        lab = read_label(root / "SegmentationClass" / f"{i}.png")
        out.append((i, lab, set(np.unique(lab).tolist()) - {0}, ctx[i]))
    return out


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", synth.KINDS)
def test_same_seed_same_bytes_and_images_independent_of_count(tmp_path, kind):
    a = synth.generate(kind, tmp_path / "a", n_train=4, n_val=2, size=48, seed=7)
    b = synth.generate(kind, tmp_path / "b", n_train=4, n_val=2, size=48, seed=7)
    c = synth.generate(kind, tmp_path / "c", n_train=4, n_val=2, size=48, seed=8)
    d = synth.generate(kind, tmp_path / "d", n_train=2, n_val=2, size=48, seed=7)
    ta, tb, tc, td = _tree(a), _tree(b), _tree(c), _tree(d)
    assert ta == tb
    images = [k for k in ta if k.endswith(".jpg")]
    assert len(images) == 6
    assert all(ta[k] != tc[k] for k in images)  # another seed -> other pictures
    # image i is drawn from its own stream: fewer images do not change the first ones
    shared = [k for k in td if k.endswith((".jpg", ".png"))]
    assert shared and all(td[k] == ta[k] for k in shared)


def test_global_rng_untouched(tmp_path):
    np.random.seed(123)
    before = np.random.get_state()
    synth.generate("cooc", tmp_path / "x", n_train=2, n_val=0, size=32)
    after = np.random.get_state()
    assert np.array_equal(after[1], before[1]) and after[2:] == before[2:]


def test_bad_arguments(tmp_path):
    with pytest.raises(LabelwiseError, match="--size"):
        synth.generate("cooc", tmp_path / "a", n_train=1, size=16)
    with pytest.raises(LabelwiseError, match="--train"):
        synth.generate("cooc", tmp_path / "a", n_train=-1)
    with pytest.raises(LabelwiseError, match="unknown testbed"):
        synth.generate("nope", tmp_path / "a")
    with pytest.raises(LabelwiseError, match="pair_rate"):
        synth.generate("cooc", tmp_path / "a", n_train=1, pair_rat=0.5)  # typo -> names the valid key
    with pytest.raises(LabelwiseError, match="out of range"):
        synth.generate("cooc", tmp_path / "a", n_train=1, context_rate=1.5)
    assert not (tmp_path / "a").exists()  # nothing written on bad input


def test_out_dir_rules(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LabelwiseError, match="not empty"):
        synth.generate("parts", foreign, n_train=1, n_val=0, size=32)
    synth.generate("parts", foreign, n_train=1, n_val=0, size=32, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    # a testbed of the same kind is regenerated in place, without stale files
    t = synth.generate("cooc", tmp_path / "t", n_train=5, n_val=0, size=32)
    synth.generate("cooc", t, n_train=2, n_val=1, size=32)
    assert len(list((t / "JPEGImages").glob("*.jpg"))) == 3
    # ... but a testbed of another kind is not overwritten silently
    with pytest.raises(LabelwiseError, match="'cooc' testbed"):
        synth.generate("objects", t, n_train=1, size=32)
    synth.generate("objects", t, n_train=1, n_val=0, size=32, overwrite=True)
    assert not (t / "JPEGImages").exists() and (t / "annotations" / "instances_train.json").is_file()
    assert synth.load_meta(t)["kind"] == "objects"


# --------------------------------------------------------------------------- cooc


def test_cooc_layout(cooc_dir):
    names = (cooc_dir / "class_names.txt").read_text().splitlines()
    assert names[0] == "background" and len(names) >= 9 and names == cooc.CLASS_NAMES
    for split, n in (("train", 200), ("val", 10)):
        ids = (cooc_dir / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert len(ids) == n == len(set(ids))
        for i in ids[:20]:
            img = read_image(cooc_dir / "JPEGImages" / f"{i}.jpg")
            lab = read_label(cooc_dir / "SegmentationClass" / f"{i}.png")
            assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
            assert lab.max() < len(names) and (lab == 0).any() and (lab > 0).any()
    meta = json.loads((cooc_dir / "meta.json").read_text())
    assert meta["kind"] == "cooc" and meta["seed"] == 3 and meta["options"]["context_rate"] == 0.8
    assert meta["classes"] == names


def test_cooc_several_objects_with_occlusion(cooc_dir):
    recs = _cooc_records(cooc_dir)
    n_components = [ndimage.label(lab > 0)[1] for _, lab, _, _ in recs]
    assert np.mean(n_components) > 1.5
    # instances of different classes overlap (occlusion): fewer foreground blobs than class blobs
    overlaps = 0
    for i in range(40):
        _, lab, _ = cooc.draw_image(draw.image_rng(0, "cooc", "probe", i), 64, dict(
            {k: v[0] for k, v in cooc.OPTIONS.items()}, min_visible=0.0, max_instances=4))
        overlaps += ndimage.label(lab > 0)[1] < sum(ndimage.label(lab == c)[1] for c in np.unique(lab) if c)
    assert overlaps > 5


def test_cooc_context_rate_follows_option(cooc_dir, tmp_path):
    def rates(records):
        occ = [ctx == cooc.CLASSES[cooc.CLASS_NAMES[c]][5] for _, _, cls, ctx in records for c in cls]
        per = {}
        for _, _, cls, ctx in records:
            for c in cls:
                per.setdefault(c, []).append(ctx == cooc.CLASSES[cooc.CLASS_NAMES[c]][5])
        return np.mean(occ), {c: np.mean(v) for c, v in per.items()}

    overall, per = rates(_cooc_records(cooc_dir))
    assert abs(overall - 0.8) < 0.07
    assert len(per) == 10 and min(per.values()) > 0.55
    meta = synth.load_meta(cooc_dir)
    assert meta["statistics"]["train"]["context_rate_overall"] == pytest.approx(overall)
    low = synth.generate("cooc", tmp_path / "low", n_train=120, n_val=0, size=48, seed=3, context_rate=0.3)
    overall_low, _ = rates(_cooc_records(low))
    assert abs(overall_low - 0.3) < 0.1


def test_cooc_pairs_frequent_but_not_always(cooc_dir):
    recs = _cooc_records(cooc_dir)
    idx = cooc.CLASS_NAMES.index

    def cond(b, a):
        with_a = [cls for _, _, cls, _ in recs if idx(a) in cls]
        return np.mean([idx(b) in cls for cls in with_a])

    assert len(cooc.PAIRS) >= 2
    for a, b in cooc.PAIRS:
        assert 0.5 < cond(b, a) < 0.93 and 0.5 < cond(a, b) < 0.93
    for a, b in cooc.GROUPS[len(cooc.PAIRS):]:
        assert cond(b, a) < 0.35  # control groups rarely meet
    group_of = {c: g for g, grp in enumerate(cooc.GROUPS) for c in grp}
    for _, _, cls, _ in recs:  # classes of one image share a context group
        assert len({group_of[cooc.CLASS_NAMES[c]] for c in cls}) == 1


def test_cooc_contexts_look_different(cooc_dir):
    """A nearest-centroid classifier on background colour/texture statistics tells contexts apart."""
    recs = _cooc_records(cooc_dir)
    feats, labels = [], []
    for i, lab, _, ctx in recs:
        img = read_image(cooc_dir / "JPEGImages" / f"{i}.jpg").astype(np.float32)
        bg = ndimage.binary_erosion(lab == 0, iterations=2)
        gx = np.abs(np.diff(img.mean(2), axis=1))[bg[:, 1:]].mean()
        gy = np.abs(np.diff(img.mean(2), axis=0))[bg[1:]].mean()
        feats.append(np.concatenate([img[bg].mean(0) / 10, [gx, gy]]))
        labels.append(ctx)
    feats, labels = np.array(feats), np.array(labels)
    train, test = slice(0, 100), slice(100, None)
    cents = {c: feats[train][labels[train] == c].mean(0) for c in cooc.CONTEXTS}
    pred = [min(cents, key=lambda c: np.linalg.norm(f - cents[c])) for f in feats[test]]
    assert np.mean(np.array(pred) == labels[test]) > 0.9


# --------------------------------------------------------------------------- parts


def test_parts_layout_and_hierarchy(parts_dir):
    h = json.loads((parts_dir / "hierarchy.json").read_text())
    assert h["objects"][0] == "background" and len(h["objects"]) >= 5
    assert h["parts"][0] == {"name": "background", "object": "background"}
    names = [p["name"] for p in h["parts"]]
    assert len(set(names)) == len(names)
    per_obj = {}
    for p in h["parts"][1:]:
        assert p["object"] in h["objects"][1:]
        per_obj[p["object"]] = per_obj.get(p["object"], 0) + 1
    assert set(per_obj) == set(h["objects"][1:]) and all(2 <= n <= 4 for n in per_obj.values())
    p2o = np.array([h["objects"].index(p["object"]) for p in h["parts"]])
    for split, n in (("train", 40), ("val", 5)):
        stems = sorted(p.stem for p in (parts_dir / "images" / split).glob("*.jpg"))
        assert len(stems) == n
        for s in stems[:15]:
            pl = read_label(parts_dir / "parts" / split / f"{s}.png")
            ol = read_label(parts_dir / "objects" / split / f"{s}.png")
            assert read_image(parts_dir / "images" / split / f"{s}.jpg").shape == (96, 96, 3)
            assert pl.max() < len(names) and ol.max() < len(h["objects"]) and pl.max() > 0
            assert np.array_equal(p2o[pl], ol)  # every part pixel lies on its own object


def test_parts_lookalikes_share_appearance(parts_dir):
    names = parts.PART_NAMES
    pix = {n: [] for n in names}
    for s in sorted((parts_dir / "images" / "train").glob("*.jpg")):
        img = read_image(s).astype(np.float32)
        pl = read_label(parts_dir / "parts" / "train" / f"{s.stem}.png")
        for k in np.unique(pl):
            inner = ndimage.binary_erosion(pl == k)  # away from JPEG bleeding at edges
            pix[names[k]].append(img[inner])
    stat = {n: (np.concatenate(v).mean(0), np.concatenate(v).std(0)) for n, v in pix.items() if v}
    assert len(parts.LOOKALIKES) >= 2
    for a, b in parts.LOOKALIKES:
        assert a.split("_")[0] != b.split("_")[0]  # alike parts belong to different objects
        assert np.abs(stat[a][0] - stat[b][0]).max() < 15, (a, b)
        assert np.abs(stat[a][1] - stat[b][1]).max() < 15, (a, b)
    # ... while the objects' own bodies differ, which is the context that tells them apart
    for a, b in (("quadruped_torso", "biped_torso"), ("car_body", "bicycle_frame")):
        assert np.abs(stat[a][0] - stat[b][0]).max() > 40, (a, b)


# --------------------------------------------------------------------------- objects


def _coco(objects_dir, split="train"):
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(objects_dir / "annotations" / f"instances_{split}.json"))


def test_objects_coco_layout(objects_dir):
    from pycocotools import mask as mask_utils

    coco = _coco(objects_dir)
    cats = coco.loadCats(coco.getCatIds())
    assert {c["isthing"] for c in cats} == {0, 1}
    stuff = {c["id"] for c in cats if c["isthing"] == 0}
    assert len(coco.getImgIds()) == 60
    for img in coco.loadImgs(coco.getImgIds()[:20]):
        assert (objects_dir / "images" / "train" / img["file_name"]).is_file()
        assert img["height"] == img["width"] == 96
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        cover = np.zeros((96, 96), np.int32)
        stuff_seen = []
        for a in anns:
            assert a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)
            m = coco.annToMask(a)
            cover += m
            assert a["area"] == m.sum() > 0
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert mask_utils.decode(a["segmentation"]).sum() == m.sum()
            if a["category_id"] in stuff:
                stuff_seen.append(a["category_id"])
        assert (cover == 1).all()  # annotations tile the image: panoptic-complete, no overlaps
        assert len(stuff_seen) == len(set(stuff_seen)) >= 1
        assert sum(a["category_id"] not in stuff for a in anns) >= 2  # several instances


def _touching_same_class_images(coco):
    n = 0
    for img_id in coco.getImgIds():
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if a["category_id"] <= len(objects.THINGS)]
        inst = np.zeros((coco.imgs[img_id]["height"], coco.imgs[img_id]["width"]), np.int32)
        for k, a in enumerate(anns, start=1):
            inst[coco.annToMask(a) > 0] = k
        pairs = objects.touching_pairs(inst)
        n += any(anns[a - 1]["category_id"] == anns[b - 1]["category_id"] for a, b in pairs)
    return n / len(coco.getImgIds())


def test_objects_touching_same_class_instances(objects_dir, tmp_path):
    frac = _touching_same_class_images(_coco(objects_dir))
    assert frac > 0.5
    meta = synth.load_meta(objects_dir)
    assert meta["statistics"]["train"]["images_with_touching_same_class"] == round(frac * 60)
    none = synth.generate("objects", tmp_path / "none", n_train=40, n_val=0, size=96, seed=2, touch_rate=0.0)
    assert _touching_same_class_images(_coco(none)) < frac / 2


def test_touching_helper():
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[1:3, 1:3] = True
    b[3:5, 1:3] = True
    assert draw.touching(a, b)
    b[:] = False
    b[4:6, 4:6] = True
    assert not draw.touching(a, b)
    inst = np.zeros((6, 6), np.int32)
    inst[a] = 1
    inst[3:5, 1:3] = 2
    inst[0, 5] = 3
    assert objects.touching_pairs(inst) == {(1, 2)}
