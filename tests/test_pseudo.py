"""Pseudo-mask generation: records, sharding + resume, skipped report, k-means, CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from labelwise import dist
from labelwise.errors import LabelwiseError
from labelwise.io import write_image
from labelwise.masks import decode_mask
from labelwise.pseudo import runner
from labelwise.pseudo.common import FeatureExtractor, kmeans, upsample_masks


def _images(root, n=5):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((40 + 4 * i, 48, 3), 30, np.uint8)
        img[5:25, 8:30] = (220, 40, 40)
        img += rng.integers(0, 20, img.shape, dtype=np.uint8)
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        write_image(sub / f"im{i}.png", img)
    return root


class CountingExtractor:
    """The same random tiny ViT for every run (deterministic), counting processed images."""

    def __init__(self):
        torch.manual_seed(0)
        self.fe = FeatureExtractor("vit_tiny_test", resolution=64, random_init=True)
        self.seen = 0

    resolution = 64

    @property
    def device(self):
        return self.fe.device

    def features(self, x):
        self.seen += len(x)
        return self.fe.features(x)


@pytest.fixture(scope="module")
def extractor():
    return CountingExtractor()


def _gen(images, out, ex, **kw):
    return runner.generate("oap", images, out, backbone="vit_tiny_test", batch_size=2, extractor=ex,
                           overrides=["oap.min_area=2", "features.num_workers=0"], show_progress=False, **kw)


def test_records_follow_the_contract(tmp_path, extractor):
    images = _images(tmp_path / "imgs")
    out = tmp_path / "oap.json"
    summary = _gen(images, out, extractor)
    res = json.loads(out.read_text())
    assert summary["images"] == 5 and summary["masks"] == len(res) > 0
    names = {"im0.png", "sub/im1.png", "im2.png", "sub/im3.png", "im4.png"}
    assert {r["file_name"] for r in res} <= names
    ids = {r["file_name"]: r["image_id"] for r in res}
    assert ids.get("im0.png", 1) == 1                                   # 1-based index in sorted listing
    for r in res:
        assert r["level"] in ("instance", "semantic")
        m = decode_mask(r["segmentation"])
        assert m.sum() == r["area"] > 0
        ys, xs = np.nonzero(m)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert "embedding" not in r
    assert not runner.parts_dir(out).exists()


def test_sharded_and_resumed_equal_single_run(tmp_path, extractor, monkeypatch):
    images = _images(tmp_path / "imgs")
    single = tmp_path / "single.json"
    _gen(images, single, extractor)
    ref = json.loads(single.read_text())

    # two ranks, rank 1 first (it does not merge), then rank 0 (merges all shards)
    sharded = tmp_path / "sharded.json"
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for rank in (1, 0):
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        _gen(images, sharded, extractor)
        if rank == 1:
            assert not sharded.exists()
            lines = (runner.parts_dir(sharded) / "shard-00001.jsonl").read_text().splitlines()
            assert len(lines) == 2                                     # images 1 and 3 of 5
    assert json.loads(sharded.read_text()) == ref
    monkeypatch.undo()

    # interrupted run: one finished image plus a truncated line; the rerun redoes only the rest
    resumed = tmp_path / "resumed.json"
    _gen(images, resumed, extractor, keep_parts=True)
    pdir = runner.parts_dir(resumed)
    shard = pdir / "shard-00000.jsonl"
    first = shard.read_text().splitlines()[0]
    shard.write_text(first + "\n" + first[: len(first) // 2])
    resumed.unlink()
    before = extractor.seen
    _gen(images, resumed, extractor)
    assert extractor.seen - before == 4
    assert json.loads(resumed.read_text()) == ref

    # a run resumed at another batch size (e.g. after running out of memory) is the same run
    again = tmp_path / "again.json"
    _gen(images, again, extractor, keep_parts=True)
    again.unlink()
    runner.generate("oap", images, again, backbone="vit_tiny_test", batch_size=1, extractor=extractor,
                    overrides=["oap.min_area=2"], show_progress=False)
    assert json.loads(again.read_text()) == ref

    # a leftover parts folder from other settings is refused
    other = tmp_path / "other.json"
    _gen(images, other, extractor, keep_parts=True)
    with pytest.raises(LabelwiseError, match="other settings"):
        runner.generate("oap", images, other, backbone="vit_tiny_test", extractor=extractor,
                        overrides=["oap.min_area=3"])


def test_unreadable_images_are_reported_not_fatal(tmp_path, extractor):
    images = _images(tmp_path / "imgs", n=2)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o.json"
    summary = _gen(images, out, extractor)
    assert summary["skipped"] == 1 and summary["images"] == 2
    rep = runner.skipped_path(out).read_text()
    assert rep.startswith("broken.jpg\t")
    assert all(r["file_name"] != "broken.jpg" for r in json.loads(out.read_text()))


def test_clusters_and_cluster_maps(tmp_path, extractor):
    from labelwise.io import list_images, read_label

    images = _images(tmp_path / "imgs", n=3)
    out = tmp_path / "c.json"
    _gen(images, out, extractor, clusters=2)
    res = json.loads(out.read_text())
    assert {r["category_id"] for r in res} <= {1, 2}
    n = runner.write_cluster_maps(out, images, tmp_path / "maps")
    assert n == 3  # one map per image
    # each map is the semantic-level masks of its image painted by ascending score, cluster id = category - 1
    for path in list_images(images):
        name = path.relative_to(images).as_posix()
        got = read_label(tmp_path / "maps" / (name.rsplit(".", 1)[0] + ".png"))
        recs = sorted((r for r in res if r["file_name"] == name and r["level"] == "semantic"),
                      key=lambda r: r["score"])
        want = np.full(got.shape, 255, np.uint8)
        for r in recs:
            want[decode_mask(r["segmentation"]).astype(bool)] = r["category_id"] - 1
        assert np.array_equal(got, want), name
        assert recs and (got != 255).any()


def test_kmeans_separates_groups_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 16)
    x = torch.cat([c + 0.05 * torch.randn(30, 16, generator=g) for c in centres])
    lab, _ = kmeans(x, 3, seed=1)
    truth = torch.arange(3).repeat_interleave(30)
    for k in range(3):                                                 # each group is one cluster
        assert lab[truth == k].unique().numel() == 1
    assert lab.unique().numel() == 3
    state = torch.get_rng_state()
    assert torch.equal(kmeans(x, 3, seed=1)[0], lab)                   # seeded, reproducible
    assert torch.equal(torch.get_rng_state(), state)                   # global RNG untouched


def test_upsample_masks_bilinear_threshold():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, 1:3, 1:3] = True
    up = upsample_masks(m, (8, 8))[0]
    assert up[2:6, 2:6].all() and up.sum() == 16


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "labelwise", "pseudo-masks", *args], capture_output=True, text=True,
                          env={"LABELWISE_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    _images(tmp_path / "imgs", n=1)
    cases = [
        (["oap", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")], "folder not found"),
        (["oap", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o.json")], "no images"),
        (["oap", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.json"), "--backbone", "resnet5O"],
         "unknown backbone"),
        # offline, DINO ViT-B/8 not cached: names --weights and the file (CRF off: without pydensecrf2 the
        # default would add its one-line notice before the error)
        (["maskcut", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.json"), "--set", "maskcut.crf=false"],
         "could not be downloaded"),
        (["maskcut", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.json"), "--set", "maskcut.crf=false"],
         "pass --weights PATH to a local file: DINO's dino_vitbase8_pretrain.pth"),
        (["oap", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.json"), "--backbone",
          "vit_base_patch16_224.nosuchtag"], "Invalid pretrained tag"),
        (["oap", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.json"), "--set", "thresholdz=1"],
         "did you mean"),
        (["oap", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o.json"), "--set", "thresholds=[0.5]"],
         "did you mean 'oap.thresholds'"),
        (["oap", "--data", "voc:" + str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")], "nope"),
    ]
    for args, needle in cases:
        p = _cli(*args)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("labelwise: error:") and needle in lines[0], p.stderr


def test_set_is_dotted_repeatable_and_reaches_the_method(tmp_path):
    from labelwise.cli.pseudo_masks import register  # noqa: F401  (the parser under test)
    from labelwise.cli import build_parser

    args = build_parser(only="pseudo-masks").parse_args(
        ["pseudo-masks", "oap", "--images", "x", "--out", "o.json", "--set", "oap.vote=mean", "--set",
         "oap.min_area=7", "features.resolution=96"])
    assert args.overrides == ["oap.vote=mean", "oap.min_area=7", "features.resolution=96"]  # nothing dropped
    from labelwise.pseudo.common import resolve_pseudo_config

    cfg = resolve_pseudo_config("oap", args.overrides, {"features": {"backbone": "vit_tiny_test"}})
    assert cfg.oap.vote == "mean" and cfg.oap.min_area == 7 and cfg.features.resolution == 96
    assert cfg.oap.center_features is False  # ViT keys are not centred unless asked
    assert resolve_pseudo_config("oap", [], {"features": {"backbone": "efficientnet_lite0"}}).oap.center_features


def test_dataset_spec_input_matches_folder_input(tmp_path, extractor):
    from labelwise.data.synth import generate

    root = generate("cooc", tmp_path / "c", n_train=2, n_val=3, size=48, seed=0)
    a = runner.generate_from_spec("oap", f"voc:{root}", "val", tmp_path / "a.json", extractor=extractor,
                                  backbone="vit_tiny_test", overrides=["oap.min_area=2"], show_progress=False)
    folder = tmp_path / "val_images"
    folder.mkdir()
    for i in (root / "ImageSets/Segmentation/val.txt").read_text().split():
        (folder / f"{i}.jpg").write_bytes((root / "JPEGImages" / f"{i}.jpg").read_bytes())
    b = runner.generate("oap", folder, tmp_path / "b.json", extractor=extractor, backbone="vit_tiny_test",
                        overrides=["oap.min_area=2"], show_progress=False)
    assert a["images"] == b["images"] == 3
    ra, rb = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert [(r["file_name"], r["segmentation"]["counts"]) for r in ra] == \
           [(r["file_name"], r["segmentation"]["counts"]) for r in rb]


def test_pseudo_masks_as_a_coco_dataset_load_in_pycocotools_and_train(tmp_path, monkeypatch):
    """--format coco-dataset writes what detectors train on (images with sizes, annotations with
    RLE, area, bbox, iscrowd 0, scores kept, one agnostic category): pycocotools loads it, and a
    method trains on it through --data coco:FILE.json,IMAGE_DIR."""
    import contextlib
    import io
    import json

    from pycocotools.coco import COCO

    from labelwise.cli import main
    from labelwise.data.synth import generate

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    root = generate("objects", tmp_path / "o", n_train=4, n_val=1, size=64, seed=0)
    images = root / "images" / "train"
    out = tmp_path / "pm.json"
    assert main(["pseudo-masks", "oap", "--images", str(images), "--out", str(out), "--backbone",
                 "efficientnet_lite0", "--resolution", "160", "--format", "coco-dataset", "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object", "isthing": 1}]
    assert len(data["images"]) == 4 and all({"height", "width", "file_name"} <= set(im) for im in data["images"])
    ann = data["annotations"][0]
    assert {"segmentation", "area", "bbox", "iscrowd", "score"} <= set(ann) and ann["iscrowd"] == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    assert len(coco.getAnnIds()) == len(data["annotations"]) > 0
    run = tmp_path / "run"
    assert main(["train", "oap", "--data", f"coco:{out},{images}", "--out", str(run), "--preset", "cpu", "--steps",
                 "1", "--set", "oap.targets=ground_truth", "model.pretrained=false", "oap.global_size=64",
                 "oap.local_size=32", "loss.num_points=128", "loss.match_points=128", "train.batch_size=2",
                 "train.eval_at_end=false", "--no-progress"]) == 0
    # infer --coco-dataset: the trained model's universal masks as a dataset too
    pred = tmp_path / "pred"
    assert main(["infer", str(run), "--data", f"coco:{out},{images}", "--split", "train", "--out", str(pred),
                 "--what", "universal", "--set", "infer.size=64", "--coco-dataset", "--no-progress"]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        COCO(str(pred / "universal_dataset.json"))
