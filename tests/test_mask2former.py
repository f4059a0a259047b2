"""Mask2Former decoder with [SEM]/[INS] queries (OAP) and point-sampled mask losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks.mask_losses import (
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    dice_loss,
    mask_losses,
    point_sample,
    shared_point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords,
)
from labelwise.modeling.decoders.mask2former import (
    MultiScaleMaskedTransformerDecoder,
    masked_attention_mask,
)

C = 32


def small_decoder(**kw):
    args = {"in_channels": C, "hidden_dim": C, "num_semantic_queries": 3, "num_instance_queries": 5, "nheads": 4,
            "dim_feedforward": 64, "dec_layers": 9, "mask_dim": C, "num_feature_levels": 3}
    args.update(kw)
    return MultiScaleMaskedTransformerDecoder(**args)


def inputs(b=2, seed=0, levels=((4, 4), (8, 8), (16, 16)), mask_hw=(32, 32), in_ch=C):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(b, in_ch, h, w, generator=g) for h, w in levels]
    return feats, torch.randn(b, C, *mask_hw, generator=g)


# ---------------------------------------------------------------------------------- decoder
def test_output_shapes_with_aux_outputs():
    torch.manual_seed(0)
    dec = small_decoder(in_channels=48, embed_dim=16, num_classes=7).eval()
    feats, mf = inputs(in_ch=48)
    out = dec(feats, mf)
    assert out["pred_masks"].shape == (2, 8, 32, 32)
    assert out["queries"].shape == (2, 8, 16)
    assert out["pred_logits"].shape == (2, 8, 8)
    assert out["level"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and out["level"].dtype == torch.long
    assert len(out["aux_outputs"]) == 9  # query init + layers 0..7; the last layer is the main output
    for aux in out["aux_outputs"]:
        assert aux["pred_masks"].shape == (2, 8, 32, 32) and aux["queries"].shape == (2, 8, 16)
        assert aux["pred_logits"].shape == (2, 8, 8)
    sd = dec.state_dict()
    for key in ["query_feat.weight", "query_embed.weight", "level_embed.weight", "sem_token", "ins_token",
                "transformer_self_attention_layers.8.self_attn.in_proj_weight",
                "transformer_cross_attention_layers.0.multihead_attn.out_proj.weight",
                "transformer_ffn_layers.3.linear1.weight", "decoder_norm.weight", "mask_embed.layers.2.weight",
                "input_proj.2.weight", "class_embed.weight"]:
        assert key in sd, key
    no_head = small_decoder(dec_layers=2).eval()(*inputs())
    assert "pred_logits" not in no_head and no_head["queries"].shape == (2, 8, C)


def test_attention_mask_builder_thresholds_and_unmasks_full_rows():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :, :2] = 5.0  # query 0 covers the left half
    logits[0, 1] = 5.0  # query 1 covers everything; query 2 covers nothing
    m = masked_attention_mask(logits, (4, 4), nheads=2)
    assert m.shape == (2, 3, 16) and m.dtype == torch.bool
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    for h in range(2):
        assert torch.equal(m[h, 0], ~left.flatten())
        assert not m[h, 1].any()
        assert not m[h, 2].any()  # would be fully masked -> unmasked


def _region_decoder(mask_value_outside: float):
    """One layer, one level, every query's initial mask = left half R of the 8x8 map
    (mask logits +10 in R, ``mask_value_outside`` elsewhere)."""
    torch.manual_seed(0)
    dec = small_decoder(dec_layers=1, num_feature_levels=1).eval()
    last = dec.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 1.0
    mf = torch.zeros(1, C, 8, 8)
    mf[0, 0] = mask_value_outside
    mf[0, 0, :, :4] = 10.0
    return dec, mf


def test_masked_cross_attention_ignores_memory_outside_mask():
    dec, mf = _region_decoder(-10.0)
    feat = torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = dec([feat], mf)["queries"]
    outside = feat.clone()
    outside[..., 4:] = torch.randn(1, C, 8, 4)
    inside = feat.clone()
    inside[..., :4] = torch.randn(1, C, 8, 4)
    torch.testing.assert_close(dec([outside], mf)["queries"], ref)
    assert (dec([inside], mf)["queries"] - ref).abs().max() > 1e-3
    # control: with the mask covering everything, memory outside R does matter
    dec_all, mf_all = _region_decoder(10.0)
    ref_all = dec_all([feat], mf_all)["queries"]
    assert (dec_all([outside], mf_all)["queries"] - ref_all).abs().max() > 1e-3


def test_fully_masked_rows_are_unmasked():
    dec, mf = _region_decoder(-10.0)
    mf[0, 0] = -10.0  # every query's mask is empty -> attends everywhere, no NaN
    feat = torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = dec([feat], mf)["queries"]
    assert torch.isfinite(ref).all()
    outside = feat.clone()
    outside[..., 4:] = torch.randn(1, C, 8, 4)
    assert (dec([outside], mf)["queries"] - ref).abs().max() > 1e-3


def test_sem_ins_tokens_tag_their_query_group():
    torch.manual_seed(0)
    dec = small_decoder(dec_layers=2).eval()
    feats, mf = inputs(b=1)
    with torch.no_grad():
        dec.sem_token.normal_()
        dec.ins_token.normal_()
    ref = dec(feats, mf)
    sem = dec.level == 0
    delta = torch.randn(C, generator=torch.Generator().manual_seed(3))  # not constant: LayerNorm would cancel it
    with torch.no_grad():  # change only [SEM]: before self-attention only semantic queries move
        dec.sem_token.add_(delta)
    out = dec(feats, mf)
    init_ref, init_out = ref["aux_outputs"][0]["queries"], out["aux_outputs"][0]["queries"]
    torch.testing.assert_close(init_out[:, ~sem], init_ref[:, ~sem])
    assert (init_out[:, sem] - init_ref[:, sem]).abs().amax(-1).min() > 1e-3
    with torch.no_grad():  # undo, then swap the two tokens: both groups' initial queries change
        dec.sem_token.sub_(delta)
        s, i = dec.sem_token.clone(), dec.ins_token.clone()
        dec.sem_token.copy_(i)
        dec.ins_token.copy_(s)
    swapped = dec(feats, mf)
    d0 = (swapped["aux_outputs"][0]["queries"] - ref["aux_outputs"][0]["queries"]).abs().amax(-1)
    assert (d0 > 1e-4).all()
    assert (swapped["pred_masks"] - ref["pred_masks"]).abs().max() > 1e-4
    # the tag table itself
    tok = dec.level_tokens()
    assert torch.equal(tok[:3], dec.sem_token.expand(3, -1)) and torch.equal(tok[3:], dec.ins_token.expand(5, -1))


def test_gradients_reach_all_parameters():
    torch.manual_seed(0)
    dec = small_decoder(in_channels=24, dec_layers=3, embed_dim=16, num_classes=4)
    feats, mf = inputs(in_ch=24)
    out = dec(feats, mf)
    loss = sum(o["pred_masks"].square().mean() + o["queries"].square().mean() + o["pred_logits"].square().mean()
               for o in [out, *out["aux_outputs"]])
    loss.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_decoder_under_bf16_autocast():
    torch.manual_seed(0)
    dec = small_decoder(dec_layers=3)
    feats, mf = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats, mf)
        losses = mask_losses(out["pred_masks"][0, :3], (torch.rand(3, 64, 64) > 0.5).float(), num_points=256)
    assert out["pred_masks"].shape == (2, 8, 32, 32)
    assert torch.isfinite(out["pred_masks"].float()).all() and torch.isfinite(out["queries"].float()).all()
    assert losses["loss_mask"].dtype == torch.float32
    (out["pred_masks"].float().mean() + losses["loss_dice"]).backward()
    assert dec.query_feat.weight.grad is not None and torch.isfinite(dec.query_feat.weight.grad).all()


# ----------------------------------------------------------------------------------- losses
def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Manual bilinear sample of img (C, H, W) at normalised (x, y), align_corners=False, zero padding."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def test_point_sample_matches_manual_bilinear():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, generator=g, dtype=torch.float64)
    coords[0, 0] = torch.tensor([0.0, 1.0])  # border points exercise the zero padding
    out = point_sample(img, coords)
    assert out.shape == (2, 3, 11)
    for n in range(2):
        for p in range(11):
            torch.testing.assert_close(out[n, :, p], _bilinear(img[n], *coords[n, p].tolist()))
    # pixel centres return the pixel value exactly
    centre = torch.tensor([[[(3 + 0.5) / 7, (2 + 0.5) / 5]]], dtype=torch.float64).expand(2, 1, 2)
    torch.testing.assert_close(point_sample(img, centre)[:, :, 0], img[:, :, 2, 3])


def test_dice_loss_perfect_and_formula():
    t = (torch.rand(4, 50, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    t[0] = 0.0  # an empty target: perfect prediction still gives 0 thanks to the +1 smoothing
    assert dice_loss(50.0 * (2 * t - 1), t).item() == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    p = x.sigmoid()
    direct = sum(1 - (2 * (p[i] * t[i]).sum() + 1) / (p[i].sum() + t[i].sum() + 1) for i in range(4))
    torch.testing.assert_close(dice_loss(x, t), direct / 4)
    torch.testing.assert_close(dice_loss(x, t, num_masks=8), direct / 8)
    ce = sum(F.binary_cross_entropy_with_logits(x[i], t[i]) for i in range(4))
    torch.testing.assert_close(sigmoid_ce_loss(x, t, num_masks=2), ce / 2)


def test_batch_costs_equal_pairwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g)
    t = (torch.rand(4, 40, generator=g) > 0.4).float()
    cost = batch_dice_cost(x, t)
    ce = batch_sigmoid_ce_cost(x, t)
    assert cost.shape == ce.shape == (6, 4)
    for q in range(6):
        for j in range(4):
            torch.testing.assert_close(cost[q, j], dice_loss(x[q:q + 1], t[j:j + 1]))
            torch.testing.assert_close(ce[q, j], F.binary_cross_entropy_with_logits(x[q], t[j]))
    p_pts, t_pts = shared_point_sample(torch.randn(6, 16, 16), torch.ones(4, 32, 32), num_points=100, generator=g)
    assert p_pts.shape == (6, 100) and t_pts.shape == (4, 100)
    assert torch.allclose(t_pts[:, 1:-1].mean(), torch.tensor(1.0), atol=0.05)


def test_uncertain_points_concentrate_near_boundary():
    # logits = 20 * (x - 0.5): the decision boundary is the vertical line x = 0.5
    xs = (torch.arange(64) + 0.5) / 64
    logits = (20 * (xs - 0.5)).expand(64, 64).expand(3, 64, 64).contiguous()
    g = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(logits, num_points=400, oversample_ratio=3.0, importance_ratio=0.75, generator=g)
    assert coords.shape == (3, 400, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    near = ((coords[..., 0] - 0.5).abs() < 0.2).float()
    # uniform sampling would put 40% of the points there; the 300 important ones all land there
    assert near[:, :300].mean() == 1.0
    assert near.mean() > 0.75
    # the uniform remainder is spread out
    assert (coords[:, 300:, 0] - 0.5).abs().max() > 0.3
    # reproducible with a generator, and the importance ratio is respected
    again = uncertain_point_coords(logits, 400, 3.0, 0.75, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(coords, again)
    uniform = uncertain_point_coords(logits, 400, 3.0, 0.0, generator=g)
    assert ((uniform[..., 0] - 0.5).abs() < 0.2).float().mean() < 0.55


def test_mask_losses_perfect_vs_wrong_and_gradients():
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(3, 64, 64)
    target[0, 8:40, 8:40] = 1
    target[1, :, 32:] = 1
    target[2, 20:32, :] = 1
    perfect = 40.0 * (2 * target - 1)  # same resolution: only a thin band around the edges is blurred
    good = mask_losses(perfect, target, num_points=1000, generator=g)
    wrong = mask_losses(-perfect, target, num_points=1000, generator=g)
    assert set(good) == {"loss_mask", "loss_dice"}
    # bilinear sampling blurs the boundary of the 16x16 logits a little: tiny, not zero
    assert good["loss_dice"] < 0.05 and good["loss_mask"] < 2.0
    assert wrong["loss_dice"] > 0.8 and wrong["loss_mask"] > 10 * good["loss_mask"]
    logits = torch.randn(3, 16, 16, requires_grad=True)
    out = mask_losses(logits, target, num_points=500, generator=g)
    (out["loss_mask"] + out["loss_dice"]).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    empty = mask_losses(logits[:0], target[:0])
    assert empty["loss_mask"].item() == 0.0 and empty["loss_dice"].item() == 0.0
