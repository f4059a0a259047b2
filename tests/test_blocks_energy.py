"""Dense-CRF energy regulariser (Tang et al. 2018), exact dense pure-PyTorch version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks.energy import dense_crf_loss, dense_gaussian_filter, energy_gate


def energy_reference(probs, image, sigma_rgb, sigma_xy, gate=None, roi=None):
    """Direct float64 double loop over pixel pairs: (1/B) sum g_i S_ki W_ij (1 - S_kj)."""
    probs, image = np.asarray(probs, np.float64), np.asarray(image, np.float64)
    B, _, H, W = probs.shape
    S = probs * (1.0 if roi is None else np.asarray(roi, np.float64)[:, None])
    g = np.ones((B, H, W)) if gate is None else np.asarray(gate, np.float64)
    total = 0.0
    for b in range(B):
        for i in range(H * W):
            yi, xi = divmod(i, W)
            for j in range(H * W):
                yj, xj = divmod(j, W)
                dp = (yi - yj) ** 2 + (xi - xj) ** 2
                dc = ((image[b, :, yi, xi] - image[b, :, yj, xj]) ** 2).sum()
                wij = math.exp(-dp / (2 * sigma_xy ** 2) - dc / (2 * sigma_rgb ** 2))
                total += g[b, yi, xi] * wij * (S[b, :, yi, xi] * (1 - S[b, :, yj, xj])).sum()
    return total / B


def _inputs(B=2, K=3, H=6, W=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(B, K, H, W, generator=g, dtype=dtype), 1)
    image = 255 * torch.rand(B, 3, H, W, generator=g, dtype=dtype)
    gate = torch.rand(B, H, W, generator=g, dtype=dtype)
    roi = (torch.rand(B, H, W, generator=g) > 0.3).to(dtype)
    return probs, image, gate, roi


@pytest.mark.parametrize("use_gate,use_roi", [(False, False), (True, False), (False, True), (True, True)])
def test_energy_matches_double_loop(use_gate, use_roi):
    probs, image, gate, roi = _inputs()
    gate = gate if use_gate else None
    roi = roi if use_roi else None
    e = dense_crf_loss(probs, image, sigma_rgb=40.0, sigma_xy=3.0, scale=1.0, gate=gate, roi=roi, chunk=8)
    ref = energy_reference(probs, image, 40.0, 3.0,
                           None if gate is None else gate.numpy(), None if roi is None else roi.numpy())
    assert e.dtype == torch.float64 and e.dim() == 0
    assert abs(e.item() - ref) < 1e-6 * max(1.0, abs(ref))


def test_chunked_equals_unchunked():
    probs, image, gate, roi = _inputs(B=2, K=4, H=9, W=7, seed=1, dtype=torch.float32)
    logits = torch.log(probs).requires_grad_(True)
    out = []
    for chunk in (7, 10000):
        p = torch.softmax(logits, 1)
        e = dense_crf_loss(p, image, sigma_rgb=20.0, sigma_xy=4.0, scale=1.0, gate=gate, roi=roi, chunk=chunk)
        (grad,) = torch.autograd.grad(e, logits)
        out.append((e.detach(), grad))
    assert out[0][0].dtype == torch.float32
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)


def _two_colour(H=16, W=16, edge=8):
    image = torch.zeros(1, 3, H, W)
    image[..., :edge] = torch.tensor([200.0, 40.0, 30.0]).view(1, 3, 1, 1)
    image[..., edge:] = torch.tensor([30.0, 60.0, 210.0]).view(1, 3, 1, 1)
    return image


def _hard_seg(H, W, edge):
    p = torch.full((1, 2, H, W), 0.02)
    p[:, 0, :, :edge] = 0.98
    p[:, 1, :, edge:] = 0.98
    return p


def test_energy_prefers_the_colour_edge_and_descends():
    H, W, edge = 16, 16, 8
    image = _two_colour(H, W, edge)
    kw = dict(sigma_rgb=15.0, sigma_xy=6.0, scale=1.0)
    e_edge = dense_crf_loss(_hard_seg(H, W, edge), image, **kw)
    e_shift = dense_crf_loss(_hard_seg(H, W, edge + 2), image, **kw)
    assert e_edge < 0.5 * e_shift
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 2, H, W, generator=g).requires_grad_(True)
    energies = []
    for _ in range(6):  # plain gradient descent on free logits
        e = dense_crf_loss(torch.softmax(logits, 1), image, **kw)
        energies.append(e.item())
        (grad,) = torch.autograd.grad(e, logits)
        logits = (logits - 0.05 * grad).detach().requires_grad_(True)
    assert energies[-1] < 0.9 * energies[0]
    assert all(b <= a + 1e-6 for a, b in zip(energies, energies[1:]))


def test_gradcheck_double():
    probs, image, gate, roi = _inputs(B=2, K=2, H=3, W=4, seed=2)
    logits = torch.log(probs).requires_grad_(True)

    def f(z):
        return dense_crf_loss(torch.softmax(z, 1), image, sigma_rgb=60.0, sigma_xy=2.0, scale=1.0,
                              gate=gate, roi=roi, chunk=5)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)
    values = torch.rand(2, 12, 3, dtype=torch.float64, requires_grad=True)
    feats = torch.rand(2, 12, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: dense_gaussian_filter(feats, v, chunk=5), (values,))


@pytest.mark.parametrize("H,W", [(8, 6), (7, 9)])
def test_downscale_uses_half_sigma_xy(H, W):
    probs, image, gate, roi = _inputs(B=2, K=3, H=H, W=W, seed=3)
    e = dense_crf_loss(probs, image, sigma_rgb=50.0, sigma_xy=8.0, scale=0.5, gate=gate, roi=roi)
    h, w = H // 2, W // 2
    # nearest at scale 0.5 takes the even pixels; bilinear (align_corners=False) at exactly 0.5 is a 2x2 mean
    img_s = image[..., 0:2 * h:2, 0:2 * w:2]
    probs_s = F.avg_pool2d(probs[..., : 2 * h, : 2 * w], 2)
    ref = energy_reference(probs_s, img_s, 50.0, 4.0, gate[:, 0:2 * h:2, 0:2 * w:2].numpy(),
                           roi[:, 0:2 * h:2, 0:2 * w:2].numpy())
    assert abs(e.item() - ref) < 1e-6 * max(1.0, abs(ref))
    wrong = energy_reference(probs_s, img_s, 50.0, 8.0, gate[:, 0:2 * h:2, 0:2 * w:2].numpy(),
                             roi[:, 0:2 * h:2, 0:2 * w:2].numpy())
    assert abs(wrong - ref) > 1e-3 * abs(ref)
    # a gate already at the downscaled size is used as is
    e2 = dense_crf_loss(probs, image, sigma_rgb=50.0, sigma_xy=8.0, scale=0.5,
                        gate=gate[:, 0:2 * h:2, 0:2 * w:2].contiguous(), roi=roi)
    assert torch.allclose(e, e2)


def test_energy_gate_matches_release_rule():
    probs = torch.tensor([[[[0.9, 0.3], [0.5, 0.2]], [[0.1, 0.7], [0.5, 0.8]]]])
    labels = torch.tensor([[[0, 255], [1, 1]]])
    roi = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    g = energy_gate(probs, labels, roi)
    expected = torch.tensor([[[0.1, 1.0], [0.5, 0.0]]])  # 1 - max; ignored -> 1; outside roi -> clipped 0
    assert torch.allclose(g, expected)
    p = probs.clone().requires_grad_(True)
    assert not energy_gate(p, labels, roi).requires_grad
    # scale: computed on the downscaled tensors, accepted by dense_crf_loss at that size
    probs4, image4, _, roi4 = _inputs(B=1, K=3, H=8, W=8, seed=4, dtype=torch.float32)
    labels4 = probs4.argmax(1)
    labels4[:, :2] = 255
    g4 = energy_gate(probs4, labels4, roi4, scale=0.5)
    assert g4.shape == (1, 4, 4)
    assert torch.allclose(g4[:, 0], torch.ones(1, 4))
    assert torch.isfinite(dense_crf_loss(probs4, image4, gate=g4, roi=roi4, scale=0.5))


def test_energy_is_float32_under_autocast():
    probs, image, gate, roi = _inputs(B=1, K=3, H=8, W=8, seed=6, dtype=torch.float32)
    ref = dense_crf_loss(probs, image, gate=gate, roi=roi)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        e = dense_crf_loss(probs, image, gate=gate, roi=roi)  # the kernel's matmuls stay float32
        e_half = dense_crf_loss(probs.bfloat16(), image, gate=gate, roi=roi)
    assert e.dtype == torch.float32 and e_half.dtype == torch.float32
    assert torch.allclose(e, ref, rtol=1e-5)
    assert torch.allclose(e_half, ref, rtol=1e-2)
