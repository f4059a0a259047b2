"""CoBra: each loss against a direct (loop) computation of its equation, the one-way flow of
CAP / SAP, the seed fusion rule and the background threshold, and the method end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelwise.methods.cobra import losses as L


def _unit(*shape, g=None):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1)


def _pair_term(v, i, j, negs, tau):
    """-log e^{v_i.v_j/tau} / (e^{v_i.v_j/tau} + sum_k e^{v_i.v_k/tau}) (Eqs. 1 and 2)."""
    s = math.exp(float(v[:, i] @ v[:, j]) / tau)
    return -math.log(s / (s + sum(math.exp(float(v[:, i] @ v[:, k]) / tau) for k in negs)))


# --------------------------------------------------------------------------- Eq. 1
def test_cap_selects_the_top_and_bottom_k_of_the_affinity_and_matches_eq1():
    g = torch.Generator().manual_seed(0)
    B, E, N, kp, kn, tau = 2, 6, 9, 2, 3, 0.1
    v = _unit(B, E, N, g=g)
    aff = torch.rand(B, N, N, generator=g, dtype=torch.float64)
    ref_sum, ref_n = 0.0, 0
    for b in range(B):
        for i in range(N):
            others = [j for j in range(N) if j != i]
            order = sorted(others, key=lambda j: float(aff[b, i, j]))
            pos, neg = order[-kp:], order[:kn]
            ref_sum += sum(_pair_term(v[b], i, j, neg, tau) for j in pos) / kp
            ref_n += 1
    assert float(L.cap_loss(v, aff, kp, kn, tau)) == pytest.approx(ref_sum / ref_n, rel=1e-6)
    assert float(L.cap_loss(v, aff, kp, kn, tau, "sum")) == pytest.approx(ref_sum / B, rel=1e-6)


def test_cap_falls_when_the_affinity_positives_are_pulled_together():
    """Two regions with high affinity inside, low across: embeddings that follow the regions score
    far lower than random ones."""
    g = torch.Generator().manual_seed(1)
    N = 16
    region = torch.arange(N) < 8
    aff = (region[:, None] == region[None, :]).double()[None] + 0.01 * torch.rand(1, N, N, generator=g,
                                                                                     dtype=torch.float64)
    rand = _unit(1, 8, N, g=g)
    aligned = F.normalize(torch.stack([region.double(), (~region).double()] + [torch.zeros(N)] * 6)[None]
                          + 0.05 * torch.randn(1, 8, N, generator=g, dtype=torch.float64), dim=1)
    assert float(L.cap_loss(aligned, aff, 5, 5, 0.1)) < float(L.cap_loss(rand, aff, 5, 5, 0.1)) - 1.0


# --------------------------------------------------------------------------- Eq. 2
def test_sap_selects_pseudo_label_patches_per_class_and_matches_eq2():
    g = torch.Generator().manual_seed(2)
    B, E, K, N, kp, kn, tau = 2, 5, 3, 12, 3, 2, 0.2
    v = _unit(B, E, N, g=g)
    m_cnn = torch.randn(B, K, 3, 4, generator=g, dtype=torch.float64)
    tags = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    probs, labels = L.cnn_pseudo_labels(m_cnn, tags)
    # pseudo labels: the tagged class of highest class-wise softmax probability
    p_ref = torch.softmax(m_cnn.flatten(2), dim=1)
    assert torch.allclose(probs.double(), p_ref, atol=1e-6)
    for b in range(B):
        tagged = [c for c in range(K) if tags[b, c] > 0]
        for n in range(N):
            assert int(labels[b, n]) == max(tagged, key=lambda c: float(p_ref[b, c, n]))
    ref_sum, ref_n = 0.0, 0
    for b in range(B):
        for c in range(K):
            if tags[b, c] == 0:
                continue
            own = [n for n in range(N) if labels[b, n] == c]
            pos = sorted(own, key=lambda n: float(probs[b, c, n]))[-kp:]
            neg = sorted([n for n in range(N) if n not in pos], key=lambda n: float(probs[b, c, n]))[:kn]
            for i in pos:
                js = [j for j in pos if j != i]
                if not js:
                    continue
                ref_sum += sum(_pair_term(v[b], i, j, neg, tau) for j in js) / len(js)
                ref_n += 1
    assert ref_n > 0
    assert float(L.sap_loss(v, probs, labels, tags, kp, kn, tau)) == pytest.approx(ref_sum / ref_n, rel=1e-5)


def test_cap_and_sap_send_gradients_only_to_the_receiving_branch(tmp_path):
    """Eq. 1 trains the CNN (its projection and backbone) and never the ViT; Eq. 2 the reverse."""
    from labelwise.config import from_dict
    from labelwise.methods.cobra.config import CoBraConfig
    from labelwise.methods.cobra.method import to_grid
    from labelwise.methods.cobra.model import CoBraNet

    cfg = from_dict(CoBraConfig, {"model": {"cnn": "efficientnet_lite0", "cnn_pretrained": False, "cnn_timm_kwargs": {},
                                            "cnn_strides": [8, 16, 32], "vit": "vit_tiny_test", "vit_pretrained": False,
                                            "vit_timm_kwargs": {}, "embed_dim": 16}})
    torch.manual_seed(0)
    net = CoBraNet(cfg, 4, pretrained=False)
    x = torch.rand(2, 3, 64, 64)
    tags = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])

    def grads(loss):
        net.zero_grad(set_to_none=True)
        loss.backward()
        return ({n for n, p in net.cnn.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0},
                {n for n, p in net.vit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})

    out = net(x)
    grid = out["vit"]["cams"].shape[-2:]
    v_c = F.normalize(to_grid(out["cnn"]["proj"], grid), dim=1).flatten(2)
    cnn_g, vit_g = grads(L.cap_loss(v_c, out["vit"]["affinity"], 3, 5, 0.1))
    assert not vit_g and any(n.startswith("proj") for n in cnn_g) and any(n.startswith("backbone") for n in cnn_g)

    out = net(x)
    probs, labels = L.cnn_pseudo_labels(to_grid(out["cnn"]["cams"], grid), tags)
    cnn_g, vit_g = grads(L.sap_loss(out["vit"]["proj"].flatten(2), probs, labels, tags, 5, 3, 0.1))
    assert not cnn_g and any(n.startswith("proj") for n in vit_g) and any(n.startswith("backbone") for n in vit_g)

    out = net(x)  # L_cam couples both branches (Sec. 4.2: it "mutually influences both")
    cnn_g, vit_g = grads(L.cam_loss(to_grid(out["cnn"]["cams"], grid), out["vit"]["cams"], tags))
    assert any(n.startswith("cam_head") for n in cnn_g) and any(n.startswith("cam_head") for n in vit_g)


# --------------------------------------------------------------------------- L_cam, fusion, threshold
def test_cam_loss_is_the_l1_plus_the_positive_class_l1():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    tags = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    d = (a - b).abs()
    pos = torch.cat([d[0, :1], d[1, 1:]])
    assert float(L.cam_loss(a, b, tags, "raw")) == pytest.approx(float(d.mean() + pos.mean()), rel=1e-6)
    assert float(L.cam_loss(a, a, tags, "raw")) == 0.0
    # localisation form: ReLU + max-normalised maps of the positive classes, absent classes zero
    na = F.relu(a) / F.relu(a).amax(dim=(2, 3), keepdim=True)
    nb = F.relu(b) / F.relu(b).amax(dim=(2, 3), keepdim=True)
    dn = (na - nb).abs() * tags[..., None, None]
    posn = torch.cat([dn[0, :1], dn[1, 1:]])
    assert float(L.cam_loss(a, b, tags)) == pytest.approx(float(dn.mean() + posn.mean()), rel=1e-4)
    assert float(L.cam_loss(a, 3.0 * a, tags)) == pytest.approx(0.0, abs=1e-5)  # shape, not scale


def test_seed_sources_follow_their_formulas():
    g = torch.Generator().manual_seed(4)
    c, t = torch.rand(2, 3, 5, 5, generator=g), torch.rand(2, 3, 5, 5, generator=g)
    assert torch.equal(L.fuse_seeds(c, t, "cnn"), c) and torch.equal(L.fuse_seeds(c, t, "vit"), t)
    assert torch.allclose(L.fuse_seeds(c, t, "mean"), (c + t) / 2)
    assert torch.allclose(L.fuse_seeds(c, t, "max"), torch.where(c > t, c, t))
    fuse = L.fuse_seeds(c, t, "fuse")  # M_fuse = max((M_cnn + M_tran) / 2, M_tran)
    assert torch.allclose(fuse, torch.where((c + t) / 2 > t, (c + t) / 2, t))
    assert (fuse >= t).all() and torch.equal(fuse > t, c > t)  # the ViT map grows only where the CNN is higher


def test_attention_threshold_hand_computed():
    """Supplement Sec. 9.1's per-image threshold on a map whose quantiles are known by hand: the 20
    values 1..20, quantile 0.3 at sorted position 0.3 x 19 = 5.7, i.e. 6.7 (linear interpolation)."""
    a = torch.arange(1.0, 21.0).reshape(1, 4, 5)
    # max-normalised: 6.7 / 20 = 0.335 -> snapped to 0.35
    assert L.attention_bg_threshold(a, 0.3, 0.05, 0.05, 0.95, "max").item() == pytest.approx(0.35)
    # min-max: (6.7 - 1) / 19 = 0.3
    assert L.attention_bg_threshold(a, 0.3, 0.05, 0.05, 0.95, "minmax").item() == pytest.approx(0.30)
    # raw (the release): 6.7 itself -> clamped to the range's top; a hundredth of it: 0.067 -> 0.05
    assert L.attention_bg_threshold(a, 0.3, 0.05, 0.05, 0.95, "raw").item() == pytest.approx(0.95)
    assert L.attention_bg_threshold(a / 100, 0.3, 0.05, 0.05, 0.95, "raw").item() == pytest.approx(0.05)
    assert L.attention_bg_threshold(a, 0.3, 0.0, 0.0, 1.0, "max").item() == pytest.approx(0.335)  # no snap
    # per image of a batch: a flat map's every quantile is its maximum
    both = L.attention_bg_threshold(torch.cat([a, torch.full_like(a, 0.01)]), 0.3, 0.05, 0.05, 0.9, "max")
    assert both.tolist() == pytest.approx([0.35, 0.9])
    with pytest.raises(ValueError, match="norm"):
        L.attention_bg_threshold(a, 0.3, 0.05, 0.05, 0.95, "median")


# --------------------------------------------------------------------------- the method
SMALL = ["data.crop_size=64", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=2",
         "train.eval_at_end=false", "model.vit=vit_tiny_test", "model.vit_timm_kwargs={}", "model.embed_dim=16",
         "loss.cam_start_epoch=0.5", "loss.contrast_start_epoch=1.0", "infer.scales=[1.0, 1.5]",
         "model.cnn_pretrained=false"]


@pytest.fixture(scope="module")
def cooc(tmp_path_factory):
    from labelwise.data.synth import generate

    return generate("cooc", tmp_path_factory.mktemp("c") / "c", n_train=8, n_val=3, size=64, seed=0)


def test_cobra_stages_its_losses_resumes_and_writes_seeds_and_masks(cooc, tmp_path, monkeypatch):
    import toy_method
    from labelwise.engine import api
    from labelwise.engine.checkpoint import load_checkpoint
    from labelwise.io import read_label

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    common = dict(method="cobra", data=f"voc:{cooc}", preset="cpu", overrides=SMALL, steps=4, show_progress=False)
    ref = api.train(out=tmp_path / "ref", **common)  # 8 images / batch 4 = 2 steps per epoch
    log = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    assert "cam" not in log[0] and "cam" in log[1] and "cap" not in log[1] and {"cap", "sap"} <= set(log[2])
    assert all(math.isfinite(r["loss"]) for r in log)
    with pytest.raises(toy_method.Crash):
        api.train(out=tmp_path / "run", hooks=[toy_method.crash_at(3)], **common)
    api.train("cobra", f"voc:{cooc}", tmp_path / "run", show_progress=False)
    a, b = load_checkpoint(ref / "checkpoints/last.pt"), load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    api.infer(ref, f"voc:{cooc}", "val", tmp_path / "pred", what="seeds,masks", show_progress=False)
    api.infer(ref, f"voc:{cooc}", "val", tmp_path / "cnn", what="seeds", overrides=["infer.source=cnn"],
              show_progress=False)
    api.infer(ref, f"voc:{cooc}", "val", tmp_path / "vit", what="seeds", overrides=["infer.source=vit"],
              show_progress=False)
    ids = (cooc / "ImageSets/Segmentation/val.txt").read_text().split()
    for i in ids:
        z = np.load(tmp_path / "pred" / f"{i}.npz")
        assert z["cams"].shape[1:] == (64, 64) and len(z["keys"]) == z["cams"].shape[0] >= 1
        assert 0.05 <= float(z["bg_threshold"]) <= 0.95
        m = read_label(tmp_path / "pred" / f"{i}.png")
        assert m.shape == (64, 64) and set(np.unique(m).tolist()) <= {0, *z["keys"].tolist()}
        c = np.load(tmp_path / "cnn" / f"{i}.npz")["cams"].astype(np.float32)
        t = np.load(tmp_path / "vit" / f"{i}.npz")["cams"].astype(np.float32)
        # the written M_fuse is the formula of the written M_cnn and M_tran (float16 files)
        assert np.allclose(z["cams"].astype(np.float32), np.maximum((c + t) / 2, t), atol=2e-3)


def test_single_branch_rows_and_bad_switches(cooc, tmp_path):
    from labelwise.engine import api
    from labelwise.errors import LabelwiseError

    common = dict(data=f"voc:{cooc}", preset="cpu", steps=1, show_progress=False)
    with pytest.raises(LabelwiseError, match="cobra.l_cam"):
        api.train("cobra", out=tmp_path / "a", overrides=SMALL + ["cobra.vit=false"], **common)
    with pytest.raises(LabelwiseError, match="infer.source"):
        api.train("cobra", out=tmp_path / "b", overrides=SMALL + ["cobra.cnn=false", "cobra.l_cam=false",
                                                                  "cobra.l_cap=false", "cobra.l_sap=false",
                                                                  "infer.source=fuse"], **common)
    run = api.train("cobra", out=tmp_path / "c", overrides=SMALL + ["cobra.vit=false", "cobra.l_cam=false",
                                                                    "cobra.l_cap=false", "cobra.l_sap=false"], **common)
    api.infer(run, f"voc:{cooc}", "val", tmp_path / "pc", what="seeds", show_progress=False)
    z = np.load(next((tmp_path / "pc").glob("*.npz")))
    assert "bg_threshold" not in z.files  # no attention map: no threshold for IRN (it uses its own numbers)


def test_the_whole_pipeline_recipe_runs_end_to_end(tmp_path, monkeypatch):
    """recipes/cobra.yaml: cobra -> seeds (cnn, vit, fuse) -> CRF masks -> IRN on the fused seeds ->
    IRN masks -> segmenter on them -> val segmentation, every stage evaluated, one table."""
    from labelwise.stages.runner import run_recipe

    pytest.importorskip("pydensecrf.densecrf", reason="the pipeline's IR labels and CRF masks need pydensecrf2")
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    res = run_recipe("cobra", tmp_path / "p", show_progress=False, log=lambda m: None,
                     overrides=["train=8", "val=3", "size=64", "steps=2", "irn_steps=2", "segmenter_steps=2",
                                "cobra.set=[data.crop_size=64, train.batch_size=4]",
                                "segmenter.set=[data.crop_size=64, train.batch_size=4]"])
    rows = {r["label"]: r for r in res["table"]}
    assert {"seed M_fuse (train)", "IRN masks (train)", "DeepLabV3+ on the IRN + CRF masks (val)"} <= set(rows)
    assert all(0.0 <= r["miou"] <= 1.0 for r in rows.values())
    npz = np.load(next((tmp_path / "p" / "seeds_fuse").glob("*.npz")))
    assert "bg_threshold" in npz.files  # IRN's thresholds come from the seeds, never from ground truth
    assert json.loads((tmp_path / "p" / "irn" / "run.json").read_text())["inputs"]["seeds"].endswith("seeds_fuse")
    import yaml

    irn_cfg = yaml.safe_load((tmp_path / "p" / "irn" / "config.yaml").read_text())
    # CoBra's IRN: IR labels from each image's attention threshold (supplement Sec. 9.1); the
    # release's walk background and the walk sized to the grid
    assert irn_cfg["irn"]["thresholds"] == "seeds" and irn_cfg["infer"]["walk_bg"] == "fixed"
    assert irn_cfg["infer"]["exp_times"] is None
    # that IRN's masks beat the seeds they refine is tested on a testbed where IRN trains long
    # enough to learn: tests/test_irn.py::test_irn_masks_beat_the_seeds_they_refine


def test_cls_rows_only_attention_and_ts_cam_coupling_are_the_full_computation():
    """``attn_rows=1`` (inference) gives exactly the CLS row of the full attention maps, and the ViT seed
    is ReLU(M_tran) x A_obj with A_obj = CLS -> patch attention averaged over heads, summed over layers."""
    from labelwise.config import from_dict
    from labelwise.methods.cobra.config import CoBraConfig
    from labelwise.methods.cobra.method import seed_maps
    from labelwise.methods.cobra.model import CoBraNet

    cfg = from_dict(CoBraConfig, {"model": {"vit": "vit_tiny_test", "vit_pretrained": False, "vit_timm_kwargs": {}},
                                  "cobra": {"cnn": False, "l_cam": False, "l_cap": False, "l_sap": False}})
    torch.manual_seed(0)
    net = CoBraNet(cfg, 3, pretrained=False).eval()
    x = torch.rand(2, 3, 64, 48)
    bb = net.vit.backbone
    with torch.no_grad():
        full = bb(x, return_attn=True, average_heads=True)
        rows = bb(x, return_attn=True, average_heads=True, attn_rows=1, return_features=False)
        for a, r in zip(full.attn, rows.attn):
            assert torch.allclose(a[:, :, :1], r, atol=1e-6)
        a_obj = torch.stack([a[:, 0, 0, 1:] for a in full.attn]).sum(0).reshape(2, 1, 8, 6)
        cams = net.vit.cam_head(full.tokens)
        want = F.interpolate(F.relu(cams) * a_obj, size=(64, 48), mode="bilinear", align_corners=False)
        want = want / (want.amax(dim=(2, 3), keepdim=True) + 1e-5)
        got = seed_maps(net, x, [1.0], flip=False)
    assert torch.allclose(got["vit"], want, atol=1e-5)
    assert torch.allclose(got["a_obj"], F.interpolate(a_obj, size=(64, 48), mode="bilinear", align_corners=False),
                          atol=1e-6)
