"""kMaX-DeepLab pixel decoder + k-means transformer decoder with query groups (CoCal Eq. 4)."""

from __future__ import annotations

import pytest
import torch

from labelwise.modeling.decoders.kmax import (
    KMaXPixelDecoder,
    KMaXTransformerDecoder,
    group_softmax,
    kmeans_cross_attention,
)

IN_CHANNELS = (16, 24, 32, 48)  # backbone widths at strides 4, 8, 16, 32
STRIDES = (4, 8, 16, 32)


def tiny_pixel_decoder(**kw):
    args = {"in_channels": IN_CHANNELS, "dec_layers": (1, 2, 1, 1), "dec_channels": (32, 16, 16, 8), "num_heads": 4}
    args.update(kw)
    return KMaXPixelDecoder(**args)


def tiny_decoder(pixel_out=(128, 64, 64, 32), **kw):
    args = {"in_channels": pixel_out, "hidden_dim": 32, "base_filters": 16, "num_heads": 4, "dim_feedforward": 64,
            "mask_dim": 16, "pixel_head_dim": 32}
    args.update(kw)
    return KMaXTransformerDecoder(**args)


def backbone_features(b=2, hw=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, hw[0] // s, hw[1] // s, generator=g) for c, s in zip(IN_CHANNELS, STRIDES)]


def loop_kmeans(affinity, values, groups):
    """Eq. 4 written out: every pixel adds its value to its argmax query, once per group."""
    b, q, n = affinity.shape
    out = torch.zeros(b, q, values.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for pi in range(n):
            start = 0
            for size in groups:
                best = max(range(start, start + size), key=lambda j: float(affinity[bi, j, pi]))
                out[bi, best] += values[bi, pi].double()
                start += size
    return out


# ------------------------------------------------------------------------ k-means cross-attention
def hand_built_case(b=2, q=5, n=7, d=3, groups=(5,), seed=0):
    """Affinities whose per-group winner of each pixel is known by construction."""
    g = torch.Generator().manual_seed(seed)
    affinity = torch.rand(b, q, n, generator=g)  # background in [0, 1)
    winners = []
    start = 0
    for size in groups:
        win = torch.randint(start, start + size, (b, n), generator=g)
        affinity.scatter_(1, win[:, None], 5.0 + torch.rand(b, 1, n, generator=g))
        winners.append(win)
        start += size
    values = torch.randn(b, n, d, generator=g)
    return affinity, values, winners


def test_kmeans_cross_attention_is_hard_assignment():
    affinity, values, (win,) = hand_built_case()
    out = kmeans_cross_attention(affinity, values)
    assert out.shape == (2, 5, 3) and out.dtype == torch.float32
    expected = torch.zeros(2, 5, 3)
    for bi in range(2):
        for pi in range(7):
            expected[bi, win[bi, pi]] += values[bi, pi]  # only the argmax query receives the pixel
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, loop_kmeans(affinity, values, [5]).float())
    # a query no pixel picked gets exactly zero
    for bi in range(2):
        for qi in set(range(5)) - set(win[bi].tolist()):
            assert torch.all(out[bi, qi] == 0)


def test_kmeans_cross_attention_groups_cluster_separately():
    groups = (3, 2, 4)
    affinity, values, winners = hand_built_case(q=9, n=11, d=4, groups=groups, seed=1)
    # make one group's global max beat the others everywhere: with groups this must not matter
    affinity[:, 5:] += 100.0
    out = kmeans_cross_attention(affinity, values, groups)
    torch.testing.assert_close(out, loop_kmeans(affinity, values, groups).float())
    expected = torch.zeros(2, 9, 4)
    for win in winners:
        for bi in range(2):
            for pi in range(11):
                expected[bi, win[bi, pi]] += values[bi, pi]
    torch.testing.assert_close(out, expected)
    # each pixel contributes exactly once per group
    start = 0
    for size in groups:
        torch.testing.assert_close(out[:, start:start + size].sum(1), values.sum(1))
        start += size
    # without groups: a single argmax over all 9 queries (the boosted group takes everything)
    flat = kmeans_cross_attention(affinity, values)
    assert torch.all(flat[:, :5] == 0)
    torch.testing.assert_close(flat, loop_kmeans(affinity, values, [9]).float())


def test_kmeans_cross_attention_gradients_flow_to_values_only():
    affinity, values, _ = hand_built_case(groups=(2, 3))
    affinity.requires_grad_(True)
    values.requires_grad_(True)
    out = kmeans_cross_attention(affinity, values, [2, 3])
    g_aff, g_val = torch.autograd.grad(out.square().sum(), [affinity, values], allow_unused=True)
    assert g_aff is None  # the assignment uses the detached affinity
    assert g_val is not None and g_val.abs().sum() > 0


def test_kmeans_cross_attention_rejects_bad_groups():
    affinity, values, _ = hand_built_case()
    with pytest.raises(ValueError):
        kmeans_cross_attention(affinity, values, [2, 2])
    with pytest.raises(ValueError):
        kmeans_cross_attention(affinity, values[:, :3])


def test_kmeans_cross_attention_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(3)
    affinity = torch.randn(2, 8, 50, generator=g)
    values = torch.randn(2, 50, 16, generator=g) * 10 + 0.1234567
    groups = [5, 3]
    ref = kmeans_cross_attention(affinity, values, groups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(values[0], values[0].T).dtype == torch.bfloat16  # autocast is really on
        out = kmeans_cross_attention(affinity, values, groups)
        low = kmeans_cross_attention(affinity.bfloat16(), values.bfloat16(), groups)
    assert out.dtype == torch.float32 and low.dtype == torch.float32
    assert torch.equal(out, ref)  # bit-identical to the fp32 result
    # bfloat16 inputs: the sum is still accumulated in fp32 (of the rounded inputs)
    torch.testing.assert_close(low, kmeans_cross_attention(affinity.bfloat16().float(),
                                                           values.bfloat16().float(), groups))


def test_group_softmax():
    logits = torch.randn(2, 8, 3, 4)
    p = group_softmax(logits, [5, 3])
    torch.testing.assert_close(p[:, :5].sum(1), torch.ones(2, 3, 4))
    torch.testing.assert_close(p[:, 5:].sum(1), torch.ones(2, 3, 4))
    torch.testing.assert_close(p[:, 5:], logits[:, 5:].softmax(1))
    torch.testing.assert_close(group_softmax(logits), logits.softmax(1))


# ---------------------------------------------------------------------------- full decoders
def test_pixel_and_transformer_decoder_shapes_groups_and_gradients():
    torch.manual_seed(0)
    pix = tiny_pixel_decoder()
    assert pix.out_channels == [128, 64, 64, 32]
    dec = tiny_decoder(pixel_out=pix.out_channels, query_groups=[5, 3])
    pix.train()
    dec.train()
    feats = backbone_features(hw=(64, 96))
    multi_scale, pixel = pix(feats)
    assert [tuple(m.shape) for m in multi_scale] == [(2, 128, 2, 3), (2, 64, 4, 6), (2, 64, 8, 12)]
    assert pixel.shape == (2, 32, 16, 24)
    out = dec(multi_scale, pixel)
    assert out["pred_masks"].shape == (2, 8, 16, 24)
    assert out["cluster_centres"].shape == (2, 8, 16)
    assert out["pixel_feature"].shape == (2, 16, 16, 24)
    assert out["query_groups"] == [5, 3]
    assert "pred_logits" not in out
    torch.testing.assert_close(out["pixel_feature"].norm(dim=1), torch.ones(2, 16, 24))
    assert len(out["aux_outputs"]) == 6  # one prediction per kMaX block, [2, 2, 2]
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_masks", "cluster_centres", "pixel_feature", "query_groups"}
        assert aux["pred_masks"].shape == (2, 8, 16, 24) and aux["cluster_centres"].shape == (2, 8, 16)
        assert aux["pixel_feature"].shape == (2, 16, 16, 24)
    # the mask logits, softmaxed per group, give a distribution over each group at every pixel
    prob = group_softmax(out["pred_masks"], out["query_groups"])
    torch.testing.assert_close(prob[:, :5].sum(1), torch.ones(2, 16, 24))
    torch.testing.assert_close(prob[:, 5:].sum(1), torch.ones(2, 16, 24))

    # every parameter takes part in a (deeply supervised) loss on masks + cluster centres
    g = torch.Generator().manual_seed(1)
    loss = 0.0
    for o in [out] + out["aux_outputs"]:
        loss = loss + (o["pred_masks"] * torch.randn(o["pred_masks"].shape, generator=g)).sum()
        loss = loss + (o["cluster_centres"] * torch.randn(o["cluster_centres"].shape, generator=g)).sum()
    loss.backward()
    for module in (pix, dec):
        missing = [n for n, p in module.named_parameters() if p.grad is None]
        assert not missing, missing
        assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    assert dec._cluster_centers.weight.grad.abs().sum() > 0
    assert pix._in_norms[0].weight.grad.abs().sum() > 0


def test_eval_mode_and_autocast_forward():
    torch.manual_seed(0)
    pix = tiny_pixel_decoder(dec_layers=(1, 1, 1, 1)).eval()
    dec = tiny_decoder(query_groups=[5, 3], dec_layers=(1, 1, 1)).eval()
    feats = backbone_features(b=1, hw=(32, 32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(*pix(feats))
    assert out["pred_masks"].shape == (1, 8, 8, 8) and torch.isfinite(out["pred_masks"].float()).all()
    assert len(out["aux_outputs"]) == 3


def test_mask_batch_norm_gamma_is_point_one():
    dec = tiny_decoder(query_groups=[5, 3])
    gammas = [m._pixel_space_mask_batch_norm.weight for m in dec.modules() if hasattr(m, "_pixel_space_mask_batch_norm")]
    assert len(gammas) == 7  # 6 kMaX blocks + the final predictor
    for gamma in gammas:
        assert gamma.shape == (1,) and gamma.item() == pytest.approx(0.1)
    assert "_predcitor._pixel_space_mask_batch_norm.weight" in dec.state_dict()  # the port's key names
    assert dec.state_dict()["_cluster_centers.weight"].shape == (32, 8)


def test_class_heads_per_group():
    torch.manual_seed(0)
    pix = tiny_pixel_decoder(dec_layers=(1, 1, 1, 1)).eval()
    feats = backbone_features(b=2, hw=(32, 64))
    multi_scale, pixel = pix(feats)
    dec = tiny_decoder(query_groups=[5, 3], num_classes=[4, 2], dec_layers=(1, 0, 1)).eval()
    out = dec(multi_scale, pixel)
    assert [tuple(t.shape) for t in out["pred_logits"]] == [(2, 5, 5), (2, 3, 3)]
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert [tuple(t.shape) for t in aux["pred_logits"]] == [(2, 5, 5), (2, 3, 3)]
    # void-biased at init: the last (void) logit dominates
    assert all((t.argmax(-1) == t.shape[-1] - 1).all() for t in out["pred_logits"])
    shared = tiny_decoder(query_groups=[5, 3], num_classes=4, dec_layers=(1, 0, 0)).eval()
    assert shared(multi_scale, pixel)["pred_logits"].shape == (2, 8, 5)
    with pytest.raises(ValueError):
        tiny_decoder(query_groups=[5, 3], num_classes=[4])
    with pytest.raises(ValueError):
        tiny_decoder(query_groups=[5, 3], num_queries=9)
