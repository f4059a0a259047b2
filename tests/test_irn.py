"""IRN (``irn``): path-max affinities, random walk, IR labels, losses, and train + infer with seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks.crf import crf_available
from labelwise.errors import LabelwiseError
from labelwise.modeling.irn import (dense_affinity, pair_displacement, pair_indices, pair_labels, path_index,
                                    path_max_affinity, random_walk)


# --------------------------------------------------------------------------- references (loops: test only)
def _path_pixels(dy: int, dx: int) -> list[tuple[int, int]]:
    """Pixels of the bounding box of 0..(dy, dx) closer than 1 to the line through both."""
    n2 = dy * dy + dx * dx
    return [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 / n2 < 1]


def _reference_affinity(b: np.ndarray, radius: int) -> dict:
    """{((y, x), (y2, x2)): 1 - max of b on the path} for every pair with 0 < |d| < radius inside b."""
    H, W = b.shape
    out = {}
    for dy in range(0, radius):
        for dx in range(-radius + 1, radius):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx >= radius * radius:
                continue
            path = _path_pixels(dy, dx)
            for y in range(H):
                for x in range(W):
                    if 0 <= y + dy < H and 0 <= x + dx < W:
                        out[((y, x), (y + dy, x + dx))] = 1.0 - max(b[y + py, x + px] for py, px in path)
    return out


def test_pair_set_is_every_offset_within_the_radius_once():
    for r in (3, 5, 10):
        pi = path_index(r)
        offs = {tuple(o) for o in pi.offsets.tolist()}
        expect = {(dy, dx) for dy in range(r) for dx in range(-r + 1, r)
                  if dy * dy + dx * dx < r * r and (dy > 0 or dx > 0)}
        assert offs == expect and len(offs) == len(pi.offsets)  # IRN Eq. 3, one per unordered pair
        for g in pi.groups:  # every path starts at its destination and holds both ends
            for p in g:
                assert {(0, 0), tuple(p[0])} <= {tuple(c) for c in p.tolist()}


def test_path_max_affinity_equals_a_direct_per_pair_reference():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(2, 13, 17, generator=g)
    r = 4
    index = pair_indices(r, 13, 17)
    aff = path_max_affinity(b, index)  # B x P x n
    ref = [_reference_affinity(b[i].numpy(), r) for i in range(2)]
    src = index.src.numpy()
    dst = index.dst.numpy()
    checked = 0
    for p in range(dst.shape[0]):
        for k in range(0, len(src), 3):
            s, d = divmod(int(src[k]), 17), divmod(int(dst[p, k]), 17)
            for i in range(2):
                assert aff[i, p, k].item() == pytest.approx(ref[i][(s, d)], abs=1e-6)
            checked += 1
    assert checked > 500
    # the dense matrix of the random walk holds the same values (symmetric, self loops 1)
    A = dense_affinity(b, r)
    for i in range(2):
        assert torch.allclose(A[i], A[i].T) and torch.all(A[i].diagonal() == 1)
        for ((y, x), (y2, x2)), v in list(ref[i].items())[::7]:
            assert A[i, y * 17 + x, y2 * 17 + x2].item() == pytest.approx(v, abs=1e-6)
        n_pairs = len(ref[i])
        assert int((A[i] > 0).sum()) <= 2 * n_pairs + 13 * 17  # nothing beyond the radius


def test_random_walk_spreads_inside_its_region_and_not_across_the_boundary():
    h, w = 16, 20
    boundary = torch.zeros(1, h, w)
    boundary[0, :, 9] = 1.0  # a wall: column 9 separates left (0..8) from right (10..19)
    cams = torch.zeros(1, 2, h, w)
    cams[0, 0, 4, 3] = 1.0  # class A seeded at one pixel on the left
    cams[0, 1, 10, 15] = 1.0  # class B seeded on the right
    out = random_walk(cams, boundary, beta=10, exp_times=8, radius=5, mode="square")
    a, bb = out[0, 0], out[0, 1]
    left, right = a[:, :9], a[:, 10:]
    assert right.abs().max() < 1e-6 and bb[:, :9].abs().max() < 1e-6  # nothing crosses the wall
    assert left.min() > 0.9 * left.max() > 0  # spread over the whole left region
    assert bb[:, 10:].min() > 0.9 * bb[:, 10:].max() > 0
    assert out[0, :, :, 9].abs().max() < 1e-6  # the wall itself has (1 - B) = 0 and no neighbours
    # iterating x <- x T 2^8 times is the same walk as squaring T 8 times
    b2 = torch.rand(1, h, w, generator=torch.Generator().manual_seed(1)) * 0.5
    c2 = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    sq = random_walk(c2, b2, exp_times=6, mode="square")
    it = random_walk(c2, b2, exp_times=6, mode="iterate")
    assert torch.allclose(sq, it, rtol=1e-3, atol=1e-6)
    # batched == one by one
    both = random_walk(torch.cat([c2, c2.flip(-1)]), torch.cat([b2, b2.flip(-1)]), exp_times=6)
    assert torch.allclose(both[1], random_walk(c2.flip(-1), b2.flip(-1), exp_times=6)[0], rtol=1e-4, atol=1e-6)


def test_walk_length_follows_the_grid_and_matters_on_a_soft_partial_boundary():
    """A core-only seed inside a disc whose boundary is soft (peak 0.5, 0.03 noise) and partial
    (15 % of the edge missing): the walk of the grid's length (2^5 on 40 x 40, the release's 2^8 on
    VOC's 125 x 94 scaled by area) grows the seed to the object; the VOC length floods the image
    through the gaps (after the global-max normalisation everything is above the 0.25 level)."""
    from labelwise.engine.api import resolve_method_config
    from labelwise.engine.registry import get_method
    from labelwise.methods.irn import walk_exp_times

    cfg = resolve_method_config(get_method("irn"), "cpu")
    assert cfg.infer.exp_times is None
    assert [walk_exp_times(c, cfg) for c in (125 * 94, 40 * 40, 32 * 32, 250 * 188, 4)] == [8, 5, 4, 10, 0]
    cfg.infer.exp_times = 3
    assert walk_exp_times(40 * 40, cfg) == 3  # a number is taken as it is

    h = w = 40
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    d = ((yy - 20) ** 2 + (xx - 17) ** 2).sqrt()
    gt = d <= 10
    seed = torch.exp(-d ** 2 / (2 * 4.0 ** 2))  # peaked on the object's core, as CAMs are
    edge = ((d > 9.3) & (d < 10.7)).float() * (torch.sin(torch.atan2(yy - 20, xx - 17) * 4) <= 0.9).float()
    boundary = (0.5 * edge + 0.03 * torch.rand(h, w, generator=torch.Generator().manual_seed(1))).clamp(0, 1)

    def iou(m):
        return float((m & gt).sum() / (m | gt).sum())

    def walked(t):
        x = random_walk(seed[None, None], boundary[None], beta=10, exp_times=t, radius=5, mode="square")[0, 0]
        return iou(x / x.max() > 0.25)  # the release: one global maximum, background level 0.25

    short, voc = walked(5), walked(8)
    assert iou(seed > 0.25) < 0.5 < 0.8 < short  # the grid's walk refines the seed to the object
    assert voc < 0.25  # the VOC walk floods: the flattened map is above 0.25 everywhere


# --------------------------------------------------------------------------- IR labels
def _two_class_seeds(H=24, W=24):
    yy, xx = np.mgrid[0:H, 0:W]
    c1 = np.clip(1.0 - np.hypot(yy - 6, xx - 6) / 10, 0, 1)  # peak 1 at (6, 6), fading
    c2 = np.clip(1.0 - np.hypot(yy - 17, xx - 17) / 10, 0, 1)
    return np.stack([c1, c2]).astype(np.float32), np.array([2, 5])


def test_ir_labels_follow_the_thresholds_and_bg_threshold_from_the_seeds(tmp_path):
    from labelwise.data.overrides import read_seeds
    from labelwise.engine.api import resolve_method_config
    from labelwise.engine.registry import get_method
    from labelwise.methods.irn import ir_label, seed_thresholds

    cams, keys = _two_class_seeds()
    img = np.full((24, 24, 3), 128, np.uint8)
    lab = ir_label(cams, keys, img, 0.30, 0.05, crf=False)
    best, arg = cams.max(0), keys[cams.argmax(0)]
    assert np.array_equal(lab[best > 0.30], arg[best > 0.30])  # confident foreground: its class
    assert np.all(lab[best <= 0.05] == 0)  # confident background
    assert np.all(lab[(best > 0.05) & (best <= 0.30)] == 255)  # in between: ignored
    assert np.all(ir_label(cams[:0], keys[:0], img, 0.3, 0.05, crf=False) == 0)  # no class: background

    cfg = resolve_method_config(get_method("irn"), "cpu", overrides=["data.crop_size=32", "data.scale_range=[1,1]",
                                                                     "data.flip=false", "irn.ir_crf=false"])
    np.savez(tmp_path / "a.npz", cams=cams.astype(np.float16), keys=keys, bg_threshold=np.float32(0.2))
    np.savez(tmp_path / "b.npz", cams=cams.astype(np.float16), keys=keys)
    sa, sb = read_seeds(tmp_path / "a.npz"), read_seeds(tmp_path / "b.npz")
    assert sa["bg_threshold"] == pytest.approx(0.2) and "bg_threshold" not in sb
    assert cfg.irn.thresholds == "fixed"  # the release's default: the file's threshold is not read
    assert seed_thresholds(sa, cfg) == (0.30, 0.05)
    cfg.irn.thresholds = "seeds"  # CoBra supplement Sec. 9.1: conf_fg = bg + fg_gap (0.5)
    assert seed_thresholds(sa, cfg) == pytest.approx((0.7, 0.2))
    assert seed_thresholds(sb, cfg) == (0.30, 0.05)  # a file without one: the numbers
    # a threshold that would leave no confident foreground on max-normalised CAMs (conf_fg >= 1)
    # is capped: conf_fg 0.9, conf_bg 0.4, and the label keeps the object's peak as foreground
    s_hi = {**sa, "bg_threshold": 0.7}
    assert seed_thresholds(s_hi, cfg) == pytest.approx((0.9, 0.4))
    lab_hi = ir_label(cams, keys, img, *seed_thresholds(s_hi, cfg), crf=False)
    assert set(np.unique(lab_hi[best > 0.9])) == {2, 5} and np.all(lab_hi[best <= 0.4] == 0)

    # the training transform: IR labels from the seeds only -- a (wrong) dataset mask is ignored
    from labelwise.methods.irn.method import _IRNTrainTransform

    tf = _IRNTrainTransform(cfg, num_classes=6)
    img32 = np.full((32, 32, 3), 100, np.uint8)
    cams32, keys32 = _two_class_seeds(32, 32)
    item = {"image": img32, "mask": np.full((32, 32), 3, np.uint8), "image_id": "x",
            "seeds": {"cams": cams32, "keys": keys32, "bg_threshold": 0.2}}
    out = tf(item, np.random.default_rng(0))
    expect = ir_label(cams32, keys32, img32, 0.7, 0.2, crf=False)[2::4, 2::4]  # the cell centres (PIL nearest)
    assert out["image"].shape == (3, 32, 32) and np.array_equal(out["label"].numpy(), expect)
    assert 3 not in np.unique(out["label"].numpy())

    # bad bg_threshold values name the file
    np.savez(tmp_path / "c.npz", cams=cams, keys=keys, bg_threshold=np.array([0.1, 0.2]))
    with pytest.raises(LabelwiseError, match="c.npz: 'bg_threshold'"):
        read_seeds(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", cams=cams, keys=keys, bg_threshold=np.float32(1.5))
    with pytest.raises(LabelwiseError, match="d.npz"):
        read_seeds(tmp_path / "d.npz")


def test_ir_label_crf_keeps_the_image_classes():
    pytest.importorskip("pydensecrf.densecrf")
    from labelwise.methods.irn import ir_label

    H = W = 64
    yy, xx = np.mgrid[0:H, 0:W]
    d1, d2 = np.hypot(yy - 18, xx - 18), np.hypot(yy - 44, xx - 44)
    cams = np.stack([np.clip(1 - d1 / 24, 0, 1), np.clip(1 - d2 / 24, 0, 1)]).astype(np.float32)
    img = np.full((H, W, 3), 40, np.uint8)  # the objects are discs of radius 12 with their own colours
    img[d1 < 12] = (220, 30, 30)
    img[d2 < 12] = (30, 30, 220)
    lab = ir_label(cams, np.array([2, 5]), img, 0.30, 0.05, crf=True)
    assert set(np.unique(lab).tolist()) <= {0, 2, 5, 255}
    # the CRF snaps both confident maps to the colour edges: classes on their discs, background off them,
    # where without it a ring of the discs is foreground and the ring beyond them ignored
    outside = (d1 > 14) & (d2 > 14)
    assert (lab[d1 < 11] == 2).mean() > 0.95 and (lab[d2 < 11] == 5).mean() > 0.95
    assert (lab[outside] == 0).mean() > 0.95
    plain = ir_label(cams, np.array([2, 5]), img, 0.30, 0.05, crf=False)
    assert (plain[outside] == 0).mean() < (lab[outside] == 0).mean()


# --------------------------------------------------------------------------- losses
def test_displacement_loss_matches_a_direct_reference_and_is_zero_for_true_centroids():
    from labelwise.methods.irn.losses import displacement_loss

    h, w, r = 9, 11, 3
    index = pair_indices(r, h, w)
    label = torch.zeros(1, h, w, dtype=torch.long)
    label[0, 2:7, 3:9] = 1
    label[0, 0, 0] = 255
    bg, fg, neg = pair_labels(label, index)
    disp = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(0))
    lfg, lbg = displacement_loss(pair_displacement(disp, index), index.offsets, bg, fg)
    # reference: loops over the pairs
    src, dst, offs = index.src.tolist(), index.dst.tolist(), index.offsets.tolist()
    sfg, nfg, sbg, nbg = 0.0, 0, 0.0, 0
    L, D = label[0].flatten().tolist(), disp[0].flatten(1)
    for p in range(len(dst)):
        for k, s in enumerate(src):
            d = dst[p][k]
            if L[s] == 255 or L[d] == 255 or L[s] != L[d]:
                continue
            delta = D[:, s] - D[:, d]  # IRN Eq. 6
            if L[s] > 0:
                sfg += float((delta - torch.tensor(offs[p])).abs().sum())
                nfg += 1
            else:
                sbg += float(delta.abs().sum())
                nbg += 1
    assert lfg.item() == pytest.approx(sfg / nfg, rel=1e-4) and lbg.item() == pytest.approx(sbg / nbg, rel=1e-4)
    # a field pointing every object pixel at the object's centroid and 0 on the background: no loss
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    obj = label[0] == 1
    true = torch.zeros(1, 2, h, w)
    true[0, 0][obj], true[0, 1][obj] = 4.0 - yy[obj], 5.5 - xx[obj]
    lfg, lbg = displacement_loss(pair_displacement(true, index), index.offsets, bg, fg)
    assert lfg.item() < 1e-5 and lbg.item() < 1e-5


def test_affinity_loss_learns_a_boundary_between_the_labels():
    from labelwise.methods.irn.losses import affinity_loss

    h, w = 12, 16
    index = pair_indices(4, h, w)
    label = torch.zeros(1, h, w, dtype=torch.long)
    label[0, :, 8:] = 3  # class 3 on the right half: the class boundary lies between columns 7 and 8
    bg, fg, neg = pair_labels(label, index)
    assert bg.any() and fg.any() and neg.any()
    logits = torch.zeros(1, h, w, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=10.0)
    losses = []
    for _ in range(150):
        pos, negl = affinity_loss(path_max_affinity(torch.sigmoid(logits), index), bg, fg, neg)
        loss = pos + negl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    prob = torch.sigmoid(logits.detach())[0].mean(0)  # per column
    border = prob[7:9].max()  # one column on the class edge carries the boundary
    inside = torch.cat([prob[3:6], prob[10:13]]).max()
    assert border > 0.7 and inside < 0.2, prob


# --------------------------------------------------------------------------- end to end
def _write_seeds(spec: str, split: str, out, *, size=None, bg_threshold=None):
    """Seeds from a testbed's masks, blurred and scaled (a stand-in for any method's CAMs)."""
    from labelwise.data.spec import build_dataset

    ds = build_dataset(spec, split)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(ds)):
        m = torch.from_numpy(ds.load_mask(i).astype(np.int64))
        keys = np.array(sorted(int(c) for c in torch.unique(m).tolist() if 0 < c < 255), dtype=np.int64)
        onehot = torch.stack([(m == k).float() for k in keys]) if len(keys) else torch.zeros(0, *m.shape)
        cams = F.avg_pool2d(onehot[None], 9, 1, 4, count_include_pad=False)[0] * 0.9 if len(keys) else onehot
        if size is not None:
            cams = F.interpolate(cams[None], size=size, mode="bilinear", align_corners=False)[0]
        extra = {} if bg_threshold is None else {"bg_threshold": np.float32(bg_threshold)}
        np.savez(out / f"{ds.ids[i]}.npz", cams=cams.numpy().astype(np.float16), keys=keys, **extra)
    return out


@pytest.fixture(scope="module")
def cooc(tmp_path_factory):
    from labelwise.data.synth import generate, testbed_spec

    root = tmp_path_factory.mktemp("irn") / "cooc"
    spec = testbed_spec("cooc", generate("cooc", root, n_train=8, n_val=3, size=64, seed=0))
    base = root.parent
    return {"spec": spec, "train": _write_seeds(spec, "train", base / "seeds-train"),
            "val": _write_seeds(spec, "val", base / "seeds-val", bg_threshold=0.3), "base": base}


SETS = ["data.crop_size=64", "train.batch_size=2", "train.log_every=1", "infer.exp_times=4"]
# the mechanics below do not depend on the label CRF; on a machine without pydensecrf2 (e.g. Python
# 3.13, where it does not build) they run without it, knowingly
NO_CRF = [] if crf_available() else ["irn.ir_crf=false"]


def test_train_and_infer_with_seeds_write_masks_and_refined_seeds(cooc, tmp_path, monkeypatch):
    from labelwise.cli import main
    from labelwise.data.spec import build_dataset
    from labelwise.engine import api
    from labelwise.io import read_label

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    spec, run = cooc["spec"], tmp_path / "run"
    api.train("irn", spec, run, preset="cpu", steps=3, seeds=cooc["train"], overrides=SETS + NO_CRF,
              show_progress=False)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3]
    assert {"aff_pos", "aff_neg", "disp_fg", "disp_bg"} <= set(log[-1])
    # IR-label statistics of every step: cell fractions sum to 1, negative pairs counted
    ir = log[-1]
    assert ir["ir_fg"] + ir["ir_bg"] + ir["ir_ignore"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= ir["ir_no_fg"] <= 1.0 and ir["ir_neg_pairs"] >= 0
    assert json.loads((run / "run.json").read_text())["inputs"]["seeds"] == str(cooc["train"].resolve())

    # the training split without --seeds: the run's own seeds
    out = tmp_path / "pred-train"
    api.infer(run, spec, "train", out, what="masks,seeds", device="cpu", show_progress=False)
    ds = build_dataset(spec, "train")
    for i in range(len(ds)):
        mask = read_label(out / f"{ds.ids[i]}.png")
        z = np.load(out / f"{ds.ids[i]}.npz")
        seeds = np.load(cooc["train"] / f"{ds.ids[i]}.npz")
        assert mask.shape == ds.load_mask(i).shape and z["cams"].dtype == np.float16
        assert z["keys"].tolist() == seeds["keys"].tolist() and z["cams"].shape == seeds["cams"].shape
        assert set(np.unique(mask).tolist()) <= {0, *seeds["keys"].tolist()}
        if len(z["keys"]):  # the masks are the walked maps against the background level (no CRF)
            maps = z["cams"].astype(np.float32)
            assert 0.0 <= maps.min() and maps.max() == pytest.approx(1.0, abs=1e-3)
            idx = np.concatenate([np.full((1, *maps.shape[1:]), 0.25, np.float32), maps]).argmax(0)
            assert (np.concatenate([[0], z["keys"]])[idx] != mask).mean() < 0.01

    # another split: --seeds (CLI), and the seeds' bg_threshold sets the background level
    val_out = tmp_path / "pred-val"
    assert main(["infer", str(run), "--data", spec, "--split", "val", "--out", str(val_out), "--what", "masks",
                 "--seeds", str(cooc["val"]), "--set", "infer.exp_times=4", "--no-progress"]) == 0
    assert len(list(val_out.glob("*.png"))) == 3
    meta = json.loads((val_out / ".labelwise-predictions.json").read_text())
    assert meta["masks"]["seeds"] == str(cooc["val"].resolve())
    # other seeds into the same folder: refused (the signature holds the seeds folder)
    other = _write_seeds(spec, "val", tmp_path / "other-val")
    with pytest.raises(LabelwiseError, match="seeds"):
        api.infer(run, spec, "val", val_out, what="masks", seeds=other, overrides=["infer.exp_times=4"],
                  show_progress=False)
    # no seeds for a split the run was not trained on: one line naming --seeds
    with pytest.raises(LabelwiseError, match="pass --seeds SEED_DIR"):
        api.infer(run, spec, "val", tmp_path / "x", what="masks", show_progress=False)
    # --seeds for a method that does not read them
    from labelwise.engine.api import _inference_seeds
    from labelwise.engine.registry import get_method

    with pytest.raises(LabelwiseError, match="does not read seeds"):
        _inference_seeds(get_method("cam"), None, run, spec, "val", cooc["val"])


def test_walk_background_is_the_release_level_unless_asked_to_read_the_seeds(cooc, tmp_path, monkeypatch):
    """infer.walk_bg fixed (default): infer.sem_seg_bg, whatever a seeds file's bg_threshold says;
    walk_bg seeds: the file's value. The walked maps' percentiles and walk length are written."""
    from labelwise.engine import api
    from labelwise.io import read_label

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    spec = cooc["spec"]
    run = api.train("irn", spec, tmp_path / "run", preset="cpu", steps=1, seeds=cooc["train"],
                    overrides=SETS + ["irn.ir_crf=false"], show_progress=False)
    hi = _write_seeds(spec, "val", tmp_path / "hi", bg_threshold=0.999)

    def fg(out, sets):
        api.infer(run, spec, "val", tmp_path / out, what="masks,seeds", seeds=hi, overrides=sets, show_progress=False)
        masks = [read_label(p) for p in sorted((tmp_path / out).glob("*.png"))]
        return sum(int((m > 0).sum()) for m in masks) / sum(m.size for m in masks)

    assert fg("a", ["infer.sem_seg_bg=0.0"]) > 0.9  # fixed: level 0 -> every pixel is some class
    assert fg("b", ["infer.sem_seg_bg=0.0", "infer.walk_bg=seeds"]) < 0.01  # the file's 0.999 wins
    z = np.load(sorted((tmp_path / "a").glob("*.npz"))[0])
    assert int(z["walk_exp_times"]) == 4 and z["boundary_quantiles"].shape == (3,)  # SETS: exp_times 4
    assert np.all(np.diff(z["boundary_quantiles"]) >= 0) and 0 <= z["boundary_quantiles"].min() <= 1


def test_bad_inputs_are_one_line_errors(cooc, tmp_path, monkeypatch, capsys):
    from labelwise.cli import main
    from labelwise.engine import api

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    spec = cooc["spec"]
    base = ["train", "irn", "--data", spec, "--steps", "1", "--set", *SETS, "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "pass --seeds SEED_DIR" in err and err.count("\n") == 1
    assert main(base + ["--out", str(tmp_path / "r2"), "--seeds", str(cooc["train"]), "--labels",
                        str(cooc["train"])]) == 2
    assert "drop --labels" in capsys.readouterr().err
    bad = _write_seeds(spec, "train", tmp_path / "small", size=(40, 40))
    with pytest.raises(LabelwiseError, match="seeds are 40x40 but the image is 64x64"):
        api.train("irn", spec, tmp_path / "r3", preset="cpu", steps=1, seeds=bad, overrides=SETS + NO_CRF,
                  show_progress=False)
    with pytest.raises(LabelwiseError, match="data.crop_size"):
        api.train("irn", spec, tmp_path / "r4", preset="cpu", steps=1, seeds=cooc["train"],
                  overrides=SETS + NO_CRF + ["data.crop_size=48"], show_progress=False)


def test_training_without_the_label_crf_stops_with_one_line(cooc, tmp_path, monkeypatch, capsys):
    """IR labels without the dense CRF lose most of their boundary pairs: without pydensecrf2 the
    training refuses with one line naming the install and the knowing opt-out."""
    import labelwise.blocks.crf as crf
    from labelwise.cli import main

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    monkeypatch.setattr(crf, "crf_available", lambda: False)
    base = ["train", "irn", "--data", cooc["spec"], "--seeds", str(cooc["train"]), "--steps", "1", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a"), "--set", *SETS]) == 2
    err = capsys.readouterr().err
    assert "pydensecrf2" in err and "irn.ir_crf=false" in err and err.count("\n") == 1
    assert main(base + ["--out", str(tmp_path / "b"), "--set", *SETS, "irn.ir_crf=false"]) == 0


def test_irn_masks_beat_the_seeds_they_refine(tmp_path, monkeypatch):
    """The pipeline's claim on a testbed: IRN (cpu preset: release IR labels with the CRF, the walk
    sized to the grid) trained on CAM-like seeds -- peaked on each object's core and blurred across
    its edges, made from the masks -- gives masks that score above those seeds at the same
    background levels (the walk's 0.25 and the cobra preset's 0.3)."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    from labelwise.data.spec import build_dataset
    from labelwise.data.synth import generate, testbed_spec
    from labelwise.engine import api
    from labelwise.evaluation.api import evaluate

    pytest.importorskip("pydensecrf.densecrf")
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    spec = testbed_spec("cooc", generate("cooc", tmp_path / "tb", n_train=24, n_val=2, size=96, seed=3))
    ds, seeds = build_dataset(spec, "train"), tmp_path / "seeds"
    seeds.mkdir()
    for i in range(len(ds)):
        m = ds.load_mask(i).astype(np.int64)
        keys = np.array(sorted(int(c) for c in np.unique(m) if 0 < c < 255), dtype=np.int64)
        cams = []
        for k in keys:
            d = distance_transform_edt(m == k)
            c = gaussian_filter((d / max(d.max(), 1.0)) ** 2, 2.0)  # a CAM: peaked on the core, spilling over
            cams.append(c / max(c.max(), 1e-6))
        np.savez(seeds / f"{ds.ids[i]}.npz", cams=np.stack(cams).astype(np.float16), keys=keys)
    run = api.train("irn", spec, tmp_path / "run", preset="cpu", steps=80, seeds=seeds,
                    overrides=["data.crop_size=64"], show_progress=False)
    api.infer(run, spec, "train", tmp_path / "masks", what="masks", seeds=seeds, show_progress=False)
    irn = evaluate("semantic", tmp_path / "masks", spec, "train")["miou"]
    for level in (0.25, 0.3):
        seed = evaluate("semantic", seeds, spec, "train", bg_threshold=level)["miou"]
        assert irn > seed + 0.1, (level, irn, seed)


def test_seeds_thresholds_without_a_threshold_in_the_seeds_say_so(cooc, tmp_path, monkeypatch):
    """irn.thresholds=seeds on seeds without 'bg_threshold' (any CAM method's) falls back to the
    config numbers, and says so in one line naming the folder."""
    from labelwise.engine import api

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    with pytest.warns(UserWarning, match="hold no bg_threshold: IR labels use irn.conf_fg / irn.conf_bg") as rec:
        api.train("irn", cooc["spec"], tmp_path / "run", preset="cpu", steps=1, seeds=cooc["train"],
                  overrides=SETS + ["irn.ir_crf=false", "irn.thresholds=seeds"], show_progress=False)
    msg = next(str(w.message) for w in rec if "bg_threshold" in str(w.message))
    assert str(cooc["train"]) in msg and "\n" not in msg
