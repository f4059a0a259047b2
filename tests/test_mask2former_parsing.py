"""CoCal Table 5: Mask2Former's criterion with query groups (blocks.mask2former_losses), its dictionary
mode, the plain (token-free) Mask2Former decoder, and kmax / cocal trained with model.decoder=mask2former."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks.mask2former_losses import mask2former_losses, mask2former_match
from labelwise.blocks.mask_losses import mask_losses, shared_point_sample

TINY = ["model.pretrained=false", "data.crop_size=64", "train.batch_size=2", "train.log_every=1",
        "train.ckpt_every=2", "train.eval_at_end=false", "model.decoder=mask2former",
        "loss.mask2former.num_points=64"]


def _case(seed=0, B=2, Q=5, groups=(3, 2), h=8, w=8, C=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, C + 1, generator=g)
    masks = torch.randn(B, Q, h, w, generator=g) * 3
    targets = []
    for b in range(B):
        tm = (torch.rand(3, h, w, generator=g) > 0.5).repeat_interleave(2, 1).repeat_interleave(2, 2)  # finer grid
        targets.append((tm, torch.tensor([1, 3, 0]), torch.tensor([0, 0, 1])))
    return logits, masks, targets, list(groups)


def _reference_match(logits, masks, target, groups, num_points, seed):
    """Direct computation: the same shared points, each pair's cost from its definition, then
    brute force over every assignment within each group."""
    g = torch.Generator().manual_seed(seed)
    p, t = shared_point_sample(masks, target[0], num_points, generator=g)
    prob = logits.softmax(-1)
    qg = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(groups))

    def cost(q, j):
        s = p[q].sigmoid()
        bce = F.binary_cross_entropy_with_logits(p[q], t[j], reduction="mean")
        dice = 1 - (2 * (s * t[j]).sum() + 1) / (s.sum() + t[j].sum() + 1)
        return -2.0 * prob[q, target[1][j]] + 5.0 * bce + 5.0 * dice

    pairs = []
    for grp in range(len(groups)):
        qs = [int(q) for q in torch.nonzero(qg == grp).squeeze(1)]
        ts = [int(j) for j in torch.nonzero(target[2] == grp).squeeze(1)]
        best = min(itertools.permutations(qs, len(ts)), key=lambda perm: sum(float(cost(q, j)) for q, j in zip(perm, ts)))
        pairs += list(zip(best, ts))
    return sorted(pairs)


def test_matcher_equals_brute_force_over_the_definition_within_each_group():
    logits, masks, targets, groups = _case()
    for b in range(2):
        got = mask2former_match(logits[b:b + 1], masks[b:b + 1], targets[b:b + 1], groups=groups, num_points=50,
                                generator=torch.Generator().manual_seed(7))[0]
        ref = _reference_match(logits[b], masks[b], targets[b], groups, 50, 7)
        assert sorted(zip(got[0].tolist(), got[1].tolist())) == ref


def test_matcher_keeps_targets_in_their_group_even_when_another_group_fits_better():
    h = w = 8
    tm = torch.zeros(2, h, w, dtype=torch.bool)
    tm[0, :4] = True
    tm[1, 4:] = True
    masks = torch.full((1, 4, h, w), -8.0)
    masks[0, 0][tm[0]] = 8.0   # query 0 (group 0) is a perfect fit for target 0, which is in group 1
    masks[0, 3][tm[0]] = 2.0   # query 3 (group 1) is a poor fit
    masks[0, 1][tm[1]] = 8.0
    got = mask2former_match(None, masks, [(tm, torch.tensor([0, 1]), torch.tensor([1, 0]))], groups=[2, 2],
                            num_points=64, generator=torch.Generator().manual_seed(0))[0]
    assert dict(zip(got[1].tolist(), got[0].tolist())) == {0: 3, 1: 1}


def test_losses_equal_mask2former_terms_and_absent_components_are_negatives():
    logits, masks, targets, groups = _case(seed=1)
    matches = [(torch.tensor([0, 2, 4]), torch.tensor([1, 0, 2])), (torch.tensor([1, 3]), torch.tensor([0, 2]))]
    kw = dict(num_points=40, oversample=3.0, importance=0.75)
    got = mask2former_losses({"pred_logits": logits, "pred_masks": masks}, targets, matches, num_classes=4,
                             num_masks=torch.tensor(5.0), generator=torch.Generator().manual_seed(3), **kw)
    # class term: cross-entropy over C + 1 with the no-object class (index 4) weighted 0.1
    target = torch.full((2, 5), 4)
    target[0, torch.tensor([0, 2, 4])] = torch.tensor([3, 1, 0])
    target[1, torch.tensor([1, 3])] = torch.tensor([1, 0])
    wt = torch.tensor([1.0, 1, 1, 1, 0.1])
    ce = -(F.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0] * wt[target]).sum() / wt[target].sum()
    assert torch.allclose(got["loss_ce"], ce, atol=1e-6)
    # mask terms: Mask2Former's mask_losses on the matched pairs, / num_masks
    src = torch.cat([masks[0, [0, 2, 4]], masks[1, [1, 3]]])
    tgt = torch.cat([targets[0][0][[1, 0, 2]], targets[1][0][[0, 2]]]).float()
    ref = mask_losses(src, tgt, generator=torch.Generator().manual_seed(3), num_masks=5.0, **kw)
    assert torch.allclose(got["loss_mask"], ref["loss_mask"]) and torch.allclose(got["loss_dice"], ref["loss_dice"])
    # dictionary mode: unmatched components add BCE against an empty mask, nothing else
    lo = masks.clone()
    hi = masks.clone()
    unmatched = torch.ones(2, 5, dtype=torch.bool)
    for b, (q, _) in enumerate(matches):
        unmatched[b, q] = False
    lo[unmatched] = -20.0
    hi[unmatched] = 20.0
    common = dict(num_classes=None, num_masks=5.0, absent_negative=True, **kw)
    a = mask2former_losses({"pred_masks": lo}, targets, matches, generator=torch.Generator().manual_seed(3), **common)
    b = mask2former_losses({"pred_masks": hi}, targets, matches, generator=torch.Generator().manual_seed(3), **common)
    assert "loss_ce" not in a and torch.allclose(a["loss_dice"], got["loss_dice"])
    assert torch.allclose(a["loss_mask"], got["loss_mask"], atol=1e-6)     # confident negatives cost ~0
    # 5 absent x BCE ~20 / num_masks 5 (a little less: points near the border blend with grid_sample's zero padding)
    assert 10.0 < float(b["loss_mask"] - got["loss_mask"]) <= 20.0


def test_losses_fall_when_the_matched_masks_move_towards_their_targets():
    logits, masks, _, groups = _case(seed=2, h=16, w=16)
    targets = []
    for b in range(2):  # rectangles: few boundaries, so uniform points (importance 0) can fit them closely
        tm = torch.zeros(3, 16, 16, dtype=torch.bool)
        tm[0, :8 + b] = True
        tm[1, 8 + b:, :6] = True
        tm[2, :, 10 - b:] = True
        targets.append((tm, torch.tensor([1, 3, 0]), torch.tensor([0, 0, 1])))
    pm = masks.clone().requires_grad_(True)
    pl = logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([pm, pl], lr=0.3)

    def loss():
        g = torch.Generator().manual_seed(0)
        m = mask2former_match(pl, pm, targets, groups=groups, num_points=64, generator=g)
        t = mask2former_losses({"pred_logits": pl, "pred_masks": pm}, targets, m, num_classes=4, num_masks=6.0,
                               num_points=64, importance=0.0, generator=g)
        return 2 * t["loss_ce"] + 5 * t["loss_mask"] + 5 * t["loss_dice"]

    first = float(loss().detach())
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    last = float(loss().detach())
    assert last < 0.2 * first


def test_plain_decoder_has_no_level_tokens_and_masks_are_its_kernels_on_the_pixels():
    from labelwise.modeling.decoders import MultiScaleMaskedTransformerDecoder

    dec = MultiScaleMaskedTransformerDecoder(in_channels=16, hidden_dim=16, num_semantic_queries=3,
                                             num_instance_queries=2, nheads=2, dim_feedforward=32, dec_layers=3,
                                             mask_dim=8, num_classes=4, level_tokens=False).eval()
    assert not any("token" in k for k in dec.state_dict())
    x = [torch.randn(2, 16, s, s) for s in (2, 4, 8)]
    mf = torch.randn(2, 8, 16, 16)
    out = dec(x, mf)
    assert out["mask_embed"].shape == (2, 5, 8) and out["pred_logits"].shape == (2, 5, 5)
    assert torch.allclose(out["pred_masks"], torch.einsum("bqc,bchw->bqhw", out["mask_embed"], mf), atol=1e-5)


def test_sigmoid_semantic_inference_equals_its_definition():
    from labelwise.methods.kmax.model import level_probabilities

    g = torch.Generator().manual_seed(0)
    P, O = 3, 2
    out = {"query_groups": [4, 3], "pred_masks": torch.randn(2, 7, 5, 5, generator=g),
           "pred_logits": torch.randn(2, 7, P + O + 1, generator=g)}
    pp, po = level_probabilities(out, P, O, False, "sigmoid")
    b, c = 1, 2
    ref = sum(out["pred_logits"][b, q, :P].softmax(-1)[c] * out["pred_masks"][b, q].sigmoid() for q in range(4))
    assert torch.allclose(pp[b, c], ref, atol=1e-6)
    ref_o = sum(out["pred_logits"][b, q, P:P + O].softmax(-1)[1] * out["pred_masks"][b, q].sigmoid()
                for q in range(4, 7))
    assert torch.allclose(po[b, 1], ref_o, atol=1e-6)


@pytest.mark.parametrize("name", ["kmax", "cocal"])
def test_mask2former_decoder_trains_parses_and_evaluates(name, tmp_path, monkeypatch):
    import math

    from labelwise.data.synth import generate, testbed_spec
    from labelwise.engine import api
    from labelwise.evaluation import evaluate
    from labelwise.engine.checkpoint import load_checkpoint

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    spec = testbed_spec("parts", generate("parts", tmp_path / "tb", n_train=4, n_val=2, size=64, seed=0))
    run = api.train(name, spec, tmp_path / "run", preset="cpu", overrides=TINY, steps=3, show_progress=False)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log) and "dice" in log[-1]
    assert ("ce" in log[-1]) == (name == "kmax")          # the dictionary has no class head
    keys = load_checkpoint(run / "checkpoints/last.pt")["model"]
    assert any(k.startswith("decoder.transformer_cross_attention_layers.") for k in keys)   # Mask2Former's decoder
    pred = api.infer(run, spec, "val", tmp_path / "pred", what="parts", show_progress=False)
    r = evaluate("parts", pred, spec, "val", progress=False)
    assert 0.0 <= r["part_miou"] <= 1.0 and 0.0 <= r["object_miou"] <= 1.0
    if name == "cocal":
        assert r["consistency"] == 1.0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_cocal_on_mask2former_trains_under_torchrun(tmp_path):
    """Two ranks (gloo): every parameter of the Mask2Former parser gets a gradient (DDP would fail
    otherwise) and the memory banks are filled identically on both ranks (all-gathered)."""
    from labelwise.data.synth import generate, testbed_spec
    from labelwise.engine.checkpoint import load_checkpoint
    from procs import explain

    spec = testbed_spec("parts", generate("parts", tmp_path / "tb", n_train=4, n_val=2, size=64, seed=0))
    run = tmp_path / "run"
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "labelwise", "train", "cocal", "--data", spec,
           "--out", str(run), "--preset", "cpu", "--steps", "2", "--no-progress", "--set", *TINY, "train.batch_size=2"]
    env = {**os.environ, "LABELWISE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, explain(r)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    state = load_checkpoint(run / "checkpoints/last.pt")["state"]
    # every image has background (part 0, object 0): 2 steps x 2 ranks x 1 image, gathered on each rank
    assert int(state["part_bank.count"][0]) == 4 and int(state["object_bank.count"][0]) == 4
