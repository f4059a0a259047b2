"""Multi-scale deformable attention (pure PyTorch) and Mask2Former's pixel decoder."""

from __future__ import annotations

import math

import pytest
import torch

from labelwise.modeling.decoders.msdeform import MSDeformAttn, ms_deform_attn
from labelwise.modeling.decoders.pixel_decoder import (
    MSDeformAttnPixelDecoder,
    PositionEmbeddingSine,
)

SHAPES = [(5, 7), (3, 4), (2, 1)]  # non-square levels, one a single column


def _level_start(shapes):
    sizes = [h * w for h, w in shapes]
    return torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)[:-1].tolist()))


def _bilinear_ref(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of ``img`` (D, H, W) at normalised (x, y) by explicit bilinear interpolation with
    zero padding; pixel (i, j) has centre ((j + 0.5) / W, (i + 0.5) / H)."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(d, dtype=img.dtype)
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * img[:, yy, xx]
    return out


def _ms_deform_attn_ref(value, shapes, locs, weights):
    n, _, m, d = value.shape
    _, lq, _, _, n_points, _ = locs.shape
    starts = _level_start(shapes).tolist()
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lvl, (hh, ww) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl] + hh * ww, h].T.reshape(d, hh, ww)
                    for p in range(n_points):
                        x, y = locs[b, q, h, lvl, p].tolist()
                        out[b, q, h] += weights[b, q, h, lvl, p] * _bilinear_ref(img, x, y)
    return out.reshape(n, lq, m * d)


def test_ms_deform_attn_matches_explicit_bilinear():
    g = torch.Generator().manual_seed(0)
    n, m, d, lq, p = 2, 3, 4, 5, 3
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    # Mostly inside, some near the borders and some well outside (zero padding).
    locs = torch.rand(n, lq, m, len(SHAPES), p, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    locs[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0], dtype=torch.float64)
    locs[0, 0, 0, :, 1] = torch.tensor([1.0, 0.999], dtype=torch.float64)
    locs[1, 1, 1, :, 2] = torch.tensor([-0.5, 1.5], dtype=torch.float64)
    weights = torch.rand(n, lq, m, len(SHAPES), p, generator=g, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    shapes_t = torch.tensor(SHAPES)
    got = ms_deform_attn(value, shapes_t, _level_start(SHAPES), locs, weights)
    want = _ms_deform_attn_ref(value, SHAPES, locs, weights)
    assert got.shape == (n, lq, m * d) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Points fully outside every level read zeros.
    far = torch.full_like(locs, 3.0)
    assert ms_deform_attn(value, shapes_t, None, far, weights).abs().max() == 0


def test_msdeformattn_zero_offsets_uniform_weights_is_level_average():
    torch.manual_seed(0)
    c, heads = 8, 2
    attn = MSDeformAttn(d_model=c, n_levels=len(SHAPES), n_heads=heads, n_points=2).double()
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()  # weight is already zero: offsets are exactly 0
    assert attn.attention_weights.weight.abs().max() == 0  # uniform weights from the init
    # identity projections so the output is the sampled input itself
    for lin in (attn.value_proj, attn.output_proj):
        with torch.no_grad():
            lin.weight.copy_(torch.eye(c, dtype=torch.float64))
            lin.bias.zero_()
    s = sum(h * w for h, w in SHAPES)
    x = torch.randn(1, s, c, dtype=torch.float64)
    query = torch.randn(1, 2, c, dtype=torch.float64)
    pts = torch.tensor([[0.31, 0.62], [0.05, 0.97]], dtype=torch.float64)
    ref = pts[None, :, None, :].expand(1, 2, len(SHAPES), 2)
    out = attn(query, ref, x, torch.tensor(SHAPES), _level_start(SHAPES))
    starts = _level_start(SHAPES).tolist()
    for q in range(2):
        want = sum(_bilinear_ref(x[0, st:st + h * w].T.reshape(c, h, w), *pts[q].tolist())
                   for st, (h, w) in zip(starts, SHAPES)) / len(SHAPES)
        torch.testing.assert_close(out[0, q], want, rtol=1e-10, atol=1e-10)


def test_msdeformattn_init_and_padding_mask():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 looks right (+x), head 1 down (+y); point k at distance k + 1 on every level
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert bias.abs().amax(-1).flatten(0, 1).sub(torch.tensor([1.0, 2.0, 3.0])).abs().max() < 1e-6
    assert attn.attention_weights.weight.abs().max() == 0 and attn.attention_weights.bias.abs().max() == 0
    # masked positions contribute nothing: changing their content leaves the output unchanged
    shapes = [(3, 3), (2, 2)]
    x = torch.randn(1, 13, 16)
    mask = torch.zeros(1, 13, dtype=torch.bool)
    mask[0, 4] = True
    mask[0, 10] = True
    q = torch.randn(1, 4, 16)
    ref = torch.rand(1, 4, 2, 2)
    a = attn(q, ref, x, torch.tensor(shapes), _level_start(shapes), mask)
    x2 = x.clone()
    x2[0, [4, 10]] += 100.0
    b = attn(q, ref, x2, torch.tensor(shapes), _level_start(shapes), mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, attn(q, ref, x2, torch.tensor(shapes), _level_start(shapes)))


def _decoder(in_channels, **kw):
    kw = {"conv_dim": 32, "mask_dim": 16, "num_layers": 2, "n_heads": 4, "n_points": 2, "ffn_dim": 64,
          "num_groups": 8, **kw}
    return MSDeformAttnPixelDecoder(in_channels, **kw)


def _feats(batch, in_channels, finest=(16, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = finest
    return [torch.randn(batch, c, h // 2 ** i, w // 2 ** i, generator=g) for i, c in enumerate(in_channels)]


@pytest.mark.parametrize("in_channels, trans", [((8, 16, 24), 3), ((8, 16, 24), 2), ((8, 16), 3), ((8, 12, 16, 24), 3)])
def test_pixel_decoder_shapes_and_all_parameters_get_gradients(in_channels, trans):
    torch.manual_seed(0)
    dec = _decoder(in_channels, transformer_in_features=trans)
    # At init the offsets / attention logits ignore the query (zero weights), so the position
    # code and level embedding get no gradient yet; perturb them as one optimiser step would.
    for layer in dec.transformer.encoder.layers:
        for lin in (layer.self_attn.sampling_offsets, layer.self_attn.attention_weights):
            with torch.no_grad():
                lin.weight.normal_(std=0.01)
    feats = _feats(2, in_channels)
    for f in feats:
        f.requires_grad_(True)
    mask_feats, ms = dec(feats)
    assert mask_feats.shape == (2, 16, 16, 12)
    n_out = min(3, len(in_channels))
    assert len(ms) == n_out
    # coarsest first, then finer
    want_sizes = [tuple(f.shape[-2:]) for f in feats][::-1][:n_out]
    assert [tuple(x.shape) for x in ms] == [(2, 32, *s) for s in want_sizes]
    loss = mask_feats.square().mean() + sum((x * torch.randn_like(x)).mean() for x in ms)
    loss.backward()
    missing = [name for name, p in dec.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, missing
    assert all(f.grad is not None and f.grad.abs().max() > 0 for f in feats)


def test_pixel_decoder_state_dict_names_follow_mask2former():
    keys = set(_decoder((8, 16, 24, 32)).state_dict())
    for k in ("input_proj.0.0.weight", "input_proj.2.1.weight", "transformer.level_embed",
              "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
              "transformer.encoder.layers.0.self_attn.value_proj.bias",
              "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.0.norm2.weight",
              "adapter_1.weight", "adapter_1.norm.weight", "layer_1.weight", "layer_1.norm.bias",
              "mask_features.weight"):
        assert k in keys, k
    assert "adapter_1.bias" not in keys and not any(k.startswith("lateral_convs") for k in keys)


def test_pixel_decoder_batch_equals_per_image():
    torch.manual_seed(0)
    dec = _decoder((8, 16, 24, 32)).eval()
    feats = _feats(3, (8, 16, 24, 32), finest=(16, 16))
    with torch.no_grad():
        m_all, ms_all = dec(feats)
        for i in range(3):
            m_i, ms_i = dec([f[i:i + 1] for f in feats])
            torch.testing.assert_close(m_all[i:i + 1], m_i, rtol=1e-4, atol=1e-5)
            for a, b in zip(ms_all, ms_i):
                torch.testing.assert_close(a[i:i + 1], b, rtol=1e-4, atol=1e-5)


def test_pixel_decoder_bfloat16_autocast():
    torch.manual_seed(0)
    dec = _decoder((8, 16, 24))
    feats = _feats(2, (8, 16, 24))
    with torch.no_grad():
        ref_mask, _ = dec(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_feats, ms = dec(feats)
    assert mask_feats.shape == ref_mask.shape
    assert torch.isfinite(mask_feats.float()).all() and all(torch.isfinite(x.float()).all() for x in ms)
    # close to the float32 result (bfloat16 has ~3 significant digits)
    err = (mask_feats.float() - ref_mask).abs().max() / ref_mask.abs().max()
    assert err < 0.1, err
    (mask_feats.float().square().mean() + sum(x.float().mean() for x in ms)).backward()
    assert dec.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad is not None


def test_position_embedding_sine():
    pe = PositionEmbeddingSine(8, normalize=True)
    x = torch.zeros(2, 3, 4, 5)
    pos = pe(x)
    assert pos.shape == (2, 16, 4, 5)
    # y half: channel 0 = sin(2*pi*(i+1)/H); x half: channel 8 = sin(2*pi*(j+1)/W)
    i = torch.arange(1, 5, dtype=torch.float32)
    j = torch.arange(1, 6, dtype=torch.float32)
    torch.testing.assert_close(pos[0, 0, :, 0], torch.sin(2 * math.pi * i / (4 + 1e-6)))
    torch.testing.assert_close(pos[0, 8, 0, :], torch.sin(2 * math.pi * j / (5 + 1e-6)))
    torch.testing.assert_close(pos[0, 1, :, 0], torch.cos(2 * math.pi * i / (4 + 1e-6)))
