"""SeCo: each loss and update against a direct (loop) computation of its equation, the mechanism
each one is for, and the method end to end (resume, torchrun, inference outputs)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelwise.methods.seco import losses as L


def _unit(*shape, g=None):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# --------------------------------------------------------------------------- token labels, PTC
def test_token_labels_follow_the_thresholds_and_the_crop():
    cams = torch.zeros(1, 2, 4, 4)
    cams[0, 0, 0, :] = 0.9   # class 1, confident
    cams[0, 1, 1, :] = 0.5   # class 2, uncertain
    cams[0, 0, 2, :] = 0.2   # background
    cams[0, 1, 3, :] = 0.95  # class 2 but absent from the tags -> its score is ignored
    tags = torch.tensor([[1.0, 0.0]])
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, :, 3] = False
    lab = L.token_labels(cams, tags, (4, 4), high=0.7, low=0.25, valid=valid)
    assert lab[0, 0, :3].tolist() == [1, 1, 1]
    assert lab[0, 1, :3].tolist() == [0, 0, 0]  # class 2 absent: max over present classes is 0
    assert lab[0, 2, :3].tolist() == [0, 0, 0] and lab[0, 3, :3].tolist() == [0, 0, 0]
    assert (lab[0, :, 3] == L.IGNORE).all()
    tags2 = torch.tensor([[1.0, 1.0]])
    lab2 = L.token_labels(cams, tags2, (4, 4), high=0.7, low=0.25)
    assert lab2[0, 1].tolist() == [L.IGNORE] * 4 and lab2[0, 3].tolist() == [2] * 4


def test_ptc_loss_matches_a_direct_computation_and_rewards_same_label_alignment():
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 3, 3), generator=g)
    lab[0, 0, 0] = L.IGNORE
    sp, n_p, sn, n_n = 0.0, 0, 0.0, 0
    for b in range(2):
        f = F.normalize(tok[b].flatten(1).t(), dim=-1)
        y = lab[b].flatten()
        for i in range(9):
            for j in range(9):
                if i == j or y[i] == L.IGNORE or y[j] == L.IGNORE:
                    continue
                s = abs(float(f[i] @ f[j]))
                if y[i] == y[j]:
                    sp, n_p = sp + s, n_p + 1
                else:
                    sn, n_n = sn + s, n_n + 1
    ref = 0.5 * (1 - sp / (n_p + 1)) + 0.5 * sn / (n_n + 1)
    assert float(L.ptc_loss(tok, lab)) == pytest.approx(ref, abs=1e-6)
    # tokens that share their label's direction (and are orthogonal across labels) score lower
    dirs = torch.eye(5, dtype=torch.float64)[:3]
    aligned = dirs[lab.clamp(max=2)].permute(0, 3, 1, 2)
    assert float(L.ptc_loss(aligned, lab)) < float(L.ptc_loss(tok, lab)) - 0.1


# --------------------------------------------------------------------------- Eq. 3 prototypes
def _eq3_sequential(P, seen, Z, tags, eta, mode):
    """Eq. 3 image by image (sample order), every W from the prototypes before the step, the first
    update of an unseen prototype taking W Z, one Norm at the end."""
    K = P.shape[0]
    P0 = F.normalize(P, dim=-1)
    acc = [P[c].clone() if seen[c] else None for c in range(K)]
    touched = [False] * K
    for b in range(Z.shape[0]):
        cls = [c for c in range(K) if tags[b, c] > 0]
        if mode == "single" and len(cls) != 1:
            continue
        if len(cls) == 1:
            w = {cls[0]: 1.0}
        else:
            s = torch.stack([F.normalize(Z[b], dim=0) @ P0[c] for c in cls])
            w = dict(zip(cls, torch.softmax(s, 0).tolist()))
        for c in cls:
            acc[c] = w[c] * Z[b] if acc[c] is None else eta * acc[c] + w[c] * (1 - eta) * Z[b]
            touched[c] = True
    P, seen = P.clone(), seen.clone()
    for c in range(K):
        if touched[c]:
            P[c], seen[c] = F.normalize(acc[c], dim=0), True
    return P, seen


@pytest.mark.parametrize("mode", ["adaptive", "single"])
def test_prototype_update_is_eq3(mode):
    g = torch.Generator().manual_seed(1)
    K, D = 4, 6
    P = _unit(K, D, g=g)
    seen = torch.tensor([True, True, False, True])
    Z = torch.randn(5, D, generator=g, dtype=torch.float64) * 3
    tags = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.float64)
    want_P, want_seen = _eq3_sequential(P, seen, Z, tags, 0.9, mode)
    L.update_prototypes(P, seen, Z, tags, 0.9, mode)
    torch.testing.assert_close(P, want_P)
    assert seen.tolist() == want_seen.tolist()
    # one single-class image and a seen prototype: exactly Norm(eta P + (1 - eta) Z)
    P1 = _unit(1, D, g=g)
    z = torch.randn(1, D, generator=g, dtype=torch.float64)
    want = F.normalize(0.9 * P1[0] + 0.1 * z[0], dim=0)
    L.update_prototypes(P1, torch.tensor([True]), z, torch.ones(1, 1, dtype=torch.float64), 0.9, mode)
    torch.testing.assert_close(P1[0], want)


def test_prototypes_follow_their_class_tokens():
    g = torch.Generator().manual_seed(2)
    K, D = 3, 8
    centres = _unit(K, D, g=g)
    P, seen = torch.zeros(K, D, dtype=torch.float64), torch.zeros(K, dtype=torch.bool)
    for _ in range(30):
        cls = torch.randint(0, K, (6,), generator=g)
        tags = F.one_hot(cls, K).double()
        Z = centres[cls] * 5 + 0.3 * torch.randn(6, D, generator=g, dtype=torch.float64)
        L.update_prototypes(P, seen, Z, tags, 0.9)
    assert seen.all()
    assert (P @ centres.t()).argmax(1).tolist() == [0, 1, 2] and float((P * centres).sum(1).min()) > 0.9


# --------------------------------------------------------------------------- Eq. 4 LiG
def test_lig_matches_eq4_and_uses_only_the_images_categories():
    g = torch.Generator().manual_seed(3)
    M, K, D, tau = 7, 5, 6, 0.1
    q, P = _unit(M, D, g=g), _unit(K, D, g=g)
    seen = torch.tensor([True, True, True, False, True])
    tags = torch.tensor([1, 2, 0, -1, 3, 4, 2])
    allowed = torch.rand(M, K, generator=g) > 0.4
    allowed[torch.arange(M), (tags - 1).clamp(min=0)] = True
    total, n = 0.0, 0
    for i in range(M):
        t = int(tags[i])
        if t <= 0 or not seen[t - 1]:
            continue
        den = [c for c in range(K) if (allowed[i, c] and seen[c]) or c == t - 1]
        logits = torch.stack([q[i] @ P[c] / tau for c in den])
        total += -(float(q[i] @ P[t - 1] / tau) - float(torch.logsumexp(logits, 0)))
        n += 1
    assert float(L.lig_loss(q, tags, P, seen, allowed, tau)) == pytest.approx(total / n, rel=1e-6)
    # a prototype outside the anchor images' categories does not change the loss
    P2 = P.clone()
    P2[1] = -P2[1]
    not_allowed = allowed.clone()
    not_allowed[:, 1] = False
    no2 = tags != 2
    base = L.lig_loss(q[no2], tags[no2], P, seen, not_allowed[no2], tau)
    assert float(L.lig_loss(q[no2], tags[no2], P2, seen, not_allowed[no2], tau)) == pytest.approx(float(base))
    # pulling an anchor towards its prototype lowers the loss
    q_close = F.normalize(q + 3 * P[(tags - 1).clamp(min=0)], dim=-1)
    assert float(L.lig_loss(q_close, tags, P, seen, allowed, tau)) < float(L.lig_loss(q, tags, P, seen, allowed, tau))


def test_lig_batch_reading_gives_single_class_anchors_negatives_the_image_reading_none():
    """The issue behind ``seco.lig_negatives=batch`` (the default): with P_s = the anchor image's own
    categories, an anchor from a single-class image has only its positive prototype in the
    denominator, so Eq. 4 is log 1 = 0 and its gradient vanishes; with P_s = the batch's categories
    it has the batch's other prototypes as negatives."""
    from labelwise.methods.seco.config import SeCoConfig

    assert SeCoConfig().seco.lig_negatives == "batch"
    g = torch.Generator().manual_seed(4)
    K, D, tau = 4, 8, 0.1
    P, seen = _unit(K, D, g=g), torch.ones(K, dtype=torch.bool)
    img_tags = torch.eye(K)  # four single-class images, one per class
    view_img = torch.arange(K).repeat_interleave(3)  # three foreground patches per image
    tags = view_img + 1
    q = _unit(len(tags), D, g=g).requires_grad_(True)
    image = img_tags[view_img] > 0
    batch = (img_tags.sum(0) > 0)[None].expand(len(tags), -1)
    pos, neg = L.lig_pairs(tags, seen, image)
    assert pos.any(1).all() and not neg.any()
    loss_image = L.lig_loss(q, tags, P, seen, image, tau)
    assert float(loss_image.detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(torch.autograd.grad(loss_image, q)[0].abs().max()) == 0.0
    pos, neg = L.lig_pairs(tags, seen, batch)
    assert (neg | pos).all() and (neg.sum(1) == K - 1).all()
    loss_batch = L.lig_loss(q, tags, P, seen, batch, tau)
    ref = torch.stack([-(q[i] @ P[tags[i] - 1] / tau - torch.logsumexp(q[i] @ P.t() / tau, 0))
                       for i in range(len(tags))]).mean()
    loss_batch, ref = float(loss_batch.detach()), float(ref.detach())
    assert loss_batch == pytest.approx(ref, rel=1e-6) and loss_batch > 0.5
    # and it separates the classes: pulling each patch to its prototype lowers it
    q_close = F.normalize(q.detach() + 3 * P[tags - 1], dim=-1)
    assert float(L.lig_loss(q_close, tags, P, seen, batch, tau)) < loss_batch


# --------------------------------------------------------------------------- Eqs. 6-7 rectification
def test_rectification_flips_exactly_the_anchors_with_abnormal_positive_similarities():
    g = torch.Generator().manual_seed(4)
    D = 16
    e1, e2 = torch.eye(D, dtype=torch.float64)[0], torch.eye(D, dtype=torch.float64)[1]
    # tag-1 positives: 40 near e1 (true class 1) and 6 near e2 (mis-tagged class-2 patches)
    bank = torch.cat([F.normalize(e1 + 0.3 * torch.randn(40, D, generator=g, dtype=torch.float64), dim=-1),
                      F.normalize(e2 + 0.3 * torch.randn(6, D, generator=g, dtype=torch.float64), dim=-1),
                      _unit(20, D, g=g)])
    bank_tags = torch.tensor([1] * 46 + [2] * 20)
    q = torch.stack([F.normalize(e1 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64), dim=0),   # clean, tag 1
                     F.normalize(e2 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64), dim=0),   # noisy, tag 1
                     F.normalize(e2 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64), dim=0)])  # tag -1 stays
    tags = torch.tensor([1, 1, -1])
    out = L.rectify_tags(q, tags, bank, bank_tags, sigma=0.6)
    assert out.tolist() == [1, -1, -1]
    # equals Eqs. 6-7 computed anchor by anchor on random data
    q = _unit(9, D, g=g)
    tags = torch.randint(-1, 3, (9,), generator=g)
    out = L.rectify_tags(q, tags, bank, bank_tags, sigma=0.5)
    for i in range(9):
        pos = [float(q[i] @ k) for k, t in zip(bank, bank_tags) if int(t) == int(tags[i]) and int(tags[i]) >= 0]
        if not pos:
            assert out[i] == tags[i]
            continue
        mu = sum(pos) / len(pos)
        noisy = sum(s < mu for s in pos) / len(pos) > 0.5
        assert int(out[i]) == (-1 if noisy else int(tags[i]))


# --------------------------------------------------------------------------- Eq. 8 LiL
def test_lil_matches_eq8_and_falls_when_positives_are_pulled_together():
    g = torch.Generator().manual_seed(5)
    M, C, D, tau = 6, 15, 8, 0.08
    q = _unit(M, D, g=g)
    cand = torch.cat([q.clone(), _unit(C - M, D, g=g)])  # the first M candidates are the anchors' own queries
    tags = torch.tensor([1, 0, 2, -1, 1, 2])
    cand_tags = torch.cat([tags, torch.randint(-1, 3, (C - M,), generator=g)])
    self_index = torch.arange(M)
    total, n_pos = 0.0, 0
    for i in range(M):
        if tags[i] < 0:
            continue
        cols = [j for j in range(C) if j != i and cand_tags[j] >= 0]
        lse = torch.logsumexp(torch.stack([q[i] @ cand[j] / tau for j in cols]), 0)
        for j in cols:
            if cand_tags[j] == tags[i]:
                total += -(float(q[i] @ cand[j] / tau) - float(lse))
                n_pos += 1
    got = L.lil_loss(q, tags, cand, cand_tags, self_index, tau)
    assert float(got) == pytest.approx(total / n_pos, rel=1e-6)
    # positives pulled together (same-tag candidates moved to their anchors' class direction) -> lower loss
    dirs = _unit(3, D, g=g)
    cand2 = cand.clone()
    ok = cand_tags >= 0
    cand2[ok] = F.normalize(cand[ok] + 4 * dirs[cand_tags[ok]], dim=-1)
    q2 = F.normalize(q + 4 * dirs[tags.clamp(min=0)], dim=-1)
    assert float(L.lil_loss(q2, tags, cand2, cand_tags, self_index, tau)) < float(got)


def test_lil_release_form_is_the_released_normalisation():
    g = torch.Generator().manual_seed(7)
    M, C, D, tau = 5, 12, 6, 0.08
    q, cand = _unit(M, D, g=g), _unit(C, D, g=g)
    tags = torch.tensor([0, 1, -1, 2, 1])
    cand_tags = torch.randint(-1, 3, (C,), generator=g)
    total, n_pos = 0.0, 0
    for i in range(M):
        if tags[i] < 0:
            continue
        cols = [j for j in range(C) if cand_tags[j] >= 0]
        pos = [j for j in cols if cand_tags[j] == tags[i]]
        if not pos:
            continue
        lse = float(torch.logsumexp(torch.stack([q[i] @ cand[j] / tau for j in cols]), 0))
        total += sum(float(q[i] @ cand[j] / tau) for j in pos) - len(cols) * lse
        n_pos += len(pos)
    got = L.lil_loss(q, tags, cand, cand_tags, None, tau, form="release")
    assert float(got) == pytest.approx(-total / (M * n_pos), rel=1e-6)
    # at the cpu preset's scale (64 anchors, ~900 candidates) its gradient is ~10x weaker than Eq. 8's;
    # beta = 0.5 was chosen with it, so it is the default form
    q = _unit(64, 32, g=g).requires_grad_(True)
    cand, t, ct = _unit(900, 32, g=g), torch.randint(0, 6, (64,), generator=g), torch.randint(-1, 6, (900,), generator=g)
    g_paper, = torch.autograd.grad(L.lil_loss(q, t, cand, ct, None, tau), q)
    g_release, = torch.autograd.grad(L.lil_loss(q, t, cand, ct, None, tau, form="release"), q)
    assert float(g_release.norm()) < float(g_paper.norm()) / 5
    from labelwise.methods.seco.config import SeCoConfig

    assert SeCoConfig().loss.lil_form == "release" and SeCoConfig().loss.lil == 0.5


def test_seg_loss_weighs_background_and_foreground_means_equally():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    lab = torch.randint(0, 3, (2, 4, 5), generator=g)
    lab[0, 0] = L.IGNORE
    ce = F.cross_entropy(logits, lab, ignore_index=L.IGNORE, reduction="none")
    bg, fg = lab == 0, (lab > 0) & (lab != L.IGNORE)
    ref = 0.5 * (ce[bg].mean() + ce[fg].mean())
    assert float(L.seg_loss(logits, lab)) == pytest.approx(float(ref), rel=1e-5)


# --------------------------------------------------------------------------- the method
EARLY = ["loss.stage_contrast=1", "loss.stage_seg=2", "seco.proto_start=1", "seco.reservoir=96",
         "data.crop_size=64", "seco.local_size=16", "seco.global_size=32", "seco.n_local=4", "train.batch_size=4",
         "model.timm_kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3, img_size: 64}",
         "model.proj_hidden=64", "train.log_every=1", "train.ckpt_every=2", "train.eval_at_end=false",
         "seco.par_size=32"]


@pytest.fixture(scope="module")
def cooc(tmp_path_factory):
    from labelwise.data.synth import generate

    return generate("cooc", tmp_path_factory.mktemp("c") / "c", n_train=12, n_val=4, size=64, seed=0)


def test_seco_trains_every_part_and_resumes_bit_identically(cooc, tmp_path, monkeypatch):
    import toy_method
    from labelwise.engine import api
    from labelwise.engine.checkpoint import load_checkpoint

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    common = dict(method="seco", data=f"voc:{cooc}", overrides=EARLY, steps=5, show_progress=False)
    ref = api.train(out=tmp_path / "ref", **common)
    log = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    assert {"lig", "lil"} <= set(log[1]) and {"seg", "reg", "rectified"} <= set(log[2])  # bank filled after step 2
    assert {"lig_anchors", "lig_with_negative"} <= set(log[2])
    assert all(0.0 <= r["lig_with_negative"] <= 1.0 for r in log if "lig_with_negative" in r)
    assert all(math.isfinite(r["loss"]) for r in log)
    a = load_checkpoint(ref / "checkpoints/last.pt")
    assert int(a["state"]["queue.count"]) > 0 and bool(a["state"]["seen"].any())
    with pytest.raises(toy_method.Crash):
        api.train(out=tmp_path / "run", hooks=[toy_method.crash_at(3)], **common)
    api.train("seco", f"voc:{cooc}", tmp_path / "run", show_progress=False)
    b = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    for part in ("model", "ema", "state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # the baseline row trains without the decomposition: no contrast terms, no reservoir entries
    base = api.train("seco", f"voc:{cooc}", tmp_path / "base", steps=3, show_progress=False,
                     overrides=EARLY + ["seco.lig=false", "seco.lil=false", "seco.rectify=false"])
    blog = [json.loads(x) for x in (base / "log.jsonl").read_text().splitlines()]
    assert not ({"lig", "lil", "rectified"} & set(blog[-1])) and "seg" in blog[-1]
    assert int(load_checkpoint(base / "checkpoints/last.pt")["state"]["queue.count"]) == 0
    # inference: the three outputs in one pass, at image size
    api.infer(ref, f"voc:{cooc}", "val", tmp_path / "pred", what="segmentation,seeds", show_progress=False)
    api.infer(ref, f"voc:{cooc}", "val", tmp_path / "masks", what="masks", show_progress=False)
    from labelwise.io import read_label

    ids = (cooc / "ImageSets/Segmentation/val.txt").read_text().split()
    for i in ids:
        assert read_label(tmp_path / "pred" / f"{i}.png").shape == (64, 64)
        z = np.load(tmp_path / "pred" / f"{i}.npz")
        assert z["cams"].shape[1:] == (64, 64) and len(z["keys"]) == z["cams"].shape[0] >= 1
        m = read_label(tmp_path / "masks" / f"{i}.png")
        assert set(np.unique(m).tolist()) <= {0, *z["keys"].tolist()}
    # the paper's columns: seeds = the single-scale flip-max min-max CAM, masks = the 7-scale one cut at
    # 0.5 without PAR (the release's tools/infer_cam.py), computed here directly from the model
    from labelwise.blocks.cam import cam_to_label
    from labelwise.data import build_dataset

    run = api.load_run(ref, device="cpu")
    item = build_dataset(f"voc:{cooc}", "val")[0]
    x = torch.from_numpy(item["image"]).permute(2, 0, 1).float()[None] / 255.0
    present = torch.as_tensor(np.asarray(item["tags"]) > 0)

    def release_cam(scales):
        total = 0
        with torch.no_grad():
            for s in scales:
                v = F.interpolate(x, size=(round(64 * s), round(64 * s)), mode="bilinear", align_corners=False)
                a = F.interpolate(run.model.cams(torch.cat([v, v.flip(-1)]))[0].float(), size=(64, 64),
                                  mode="bilinear", align_corners=False)
                total = total + torch.relu(torch.maximum(a[:1], a[1:].flip(-1)))
        total = total - total.amin(dim=(-2, -1), keepdim=True)
        return total / (total.amax(dim=(-2, -1), keepdim=True) + 1e-5)

    z = np.load(tmp_path / "pred" / f"{item['image_id']}.npz")
    keys = torch.nonzero(present).flatten()
    assert z["keys"].tolist() == (keys + 1).tolist()
    assert np.allclose(z["cams"].astype(np.float32), release_cam([1.0])[0, keys].numpy(), atol=2e-3)
    ms = release_cam([1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0])
    want = cam_to_label(ms, present[None].float(), 0.5)[0].numpy()
    got = read_label(tmp_path / "masks" / f"{item['image_id']}.png")
    assert (got == want).mean() > 0.999


def test_rectify_without_lil_is_a_config_error(cooc, tmp_path):
    from labelwise.engine import api
    from labelwise.errors import LabelwiseError

    with pytest.raises(LabelwiseError, match="seco.rectify"):
        api.train("seco", f"voc:{cooc}", tmp_path / "r", steps=1, show_progress=False,
                  overrides=EARLY + ["seco.lil=false"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_seco_two_ranks_gather_the_reservoir(cooc, tmp_path):
    env = {**os.environ, "LABELWISE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "labelwise", "train", "seco", "--data",
           f"voc:{cooc}", "--out", str(tmp_path / "run"), "--steps", "3", "--set", *EARLY, "train.batch_size=4",
           "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)["state"]
    # 2 enqueues (steps 2 and 3) x 2 ranks x 2 images x (2 global + 4 local) views
    assert int(state["queue.count"]) == 2 * 2 * 2 * 6
    tags = state["queue.labels"][: int(state["queue.count"]), 0]
    assert ((tags >= -1) & (tags <= 10)).all()


def test_ablation_tables_average_replicates_and_groups(tmp_path):
    """``bench/seco_tables.py``: Table 2 cells are replicate means (values listed), Table 3 cells
    the mean over the recipe's class groups, per replicate, then averaged."""
    import runpy

    from labelwise.stages import load_recipe

    groups = load_recipe("seco-ablation").table_groups
    classes = [c for g in groups.values() for c in g]
    paths = []
    for rep, base in enumerate((0.5, 0.7)):
        rows = []
        for row in ("baseline", "wo_lig", "wo_lil", "wo_rec", "seco"):
            for prefix in ("seeds", "masks", "seg"):
                rows.append({"stage": f"{prefix}_{row}", "miou": base, "precision": 0.8, "recall": 0.6,
                             "confusion_ratio": 0.2,
                             "per_class_iou": {c: base + (0.1 if c in groups["control"] else 0.0) for c in classes},
                             "per_class_confusion_ratio": {c: float("inf") if c == "disc" else 0.3 for c in classes}})
        paths.append(tmp_path / f"t{rep}.json")
        paths[-1].write_text(json.dumps(rows).replace("Infinity", "1e999"))
    mod = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "bench", "seco_tables.py"))
    text = mod["tables"]([json.loads(p.read_text()) for p in paths])
    assert "| Baseline | 0.600 (0.500 / 0.700) | 0.600 (0.500 / 0.700) | 0.600 (0.500 / 0.700) | 0.800 (0.800 / " \
           "0.800) | 0.600 (0.600 / 0.600) | 0.200 (0.200 / 0.200) |" in text
    # co-occurring IoU 0.6 on average, FP/TP 0.3 (disc's infinite ratio has no finite mean); control IoU 0.7
    assert "| SeCo | 0.600 (0.500 / 0.700) | 0.300 (0.300 / 0.300) | 0.700 (0.600 / 0.800) | 0.300 (0.300 / " \
           "0.300) |" in text


def test_seco_refuses_gradient_accumulation(cooc, tmp_path):
    """The reservoir and prototypes are updated once per step from its one forward: accumulating
    forwards would drop all but the last one's keys, so it is refused in one line."""
    from labelwise.engine import api
    from labelwise.errors import LabelwiseError

    with pytest.raises(LabelwiseError, match="cannot accumulate"):
        api.train("seco", f"voc:{cooc}", tmp_path / "r", steps=1, show_progress=False,
                  overrides=EARLY + ["train.batch_per_gpu=2"])
