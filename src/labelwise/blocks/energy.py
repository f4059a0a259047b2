"""Dense-CRF energy regulariser (the "reg" loss of AFA / ToCo / SeCo), exact and in pure PyTorch.

Tang, Perazzi, Djelouah, Ben Ayed, Schroers, Boykov, "On Regularized Losses for
Weakly-supervised CNN Segmentation" (ECCV 2018), Sec. 3: the relaxed Potts / dense-CRF
energy of the soft segmentation ``S`` (K x N, one row per class),

    E(S) = sum_k S_k^T W (1 - S_k),                                                (Tang et al., Sec. 3)
    W_ij = exp( -|p_i - p_j|^2 / (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_rgb^2) ),

with pixel positions ``p`` (x = column, y = row) and RGB colours ``I`` (0..255 units); the
self term ``W_ii = 1`` is included and ``W`` is not normalised. The releases filter with a
compiled permutohedral lattice (an approximation, up to the lattice's own constant factor);
here ``W X`` is computed **exactly** and densely in row chunks (``chunk x N`` at a time,
never an ``N x N`` matrix), in float32 even under autocast (float64 if the inputs are).

:func:`dense_crf_loss` is the loss; :func:`energy_gate` the release's per-pixel gate;
:func:`dense_gaussian_filter` the exact filter ``W X`` (its backward is the same filter,
``W`` being symmetric, recomputed chunk by chunk so no kernel is stored for autograd).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["spatial_kernel_mass", "dense_crf_loss", "energy_gate", "dense_gaussian_filter", "crf_features"]


def _autocast_off(device: torch.device):
    """Disable autocast on ``device`` (no-op context where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        return contextlib.nullcontext()


def _float_dtype(*xs: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype) if x.is_floating_point() else dtype
    return dtype


def _filter(feats: torch.Tensor, values: torch.Tensor, chunk: int) -> torch.Tensor:
    """``out_b = W_b values_b`` with ``W_b,ij = exp(-|f_bi - f_bj|^2 / 2)``, rows in chunks.

    ``feats`` (B, N, D), ``values`` (B, N, K). Per image and row chunk the ``chunk x N`` kernel
    is built once (``|f_i|^2 + |f_j|^2 - 2 f_i . f_j``, clamped at 0) and multiplied by the
    N x K values, so memory is O(chunk x N).
    """
    with _autocast_off(feats.device):
        dtype = _float_dtype(feats, values)
        feats = feats.to(dtype)
        values = values.to(dtype)
        feats = feats - feats.mean(dim=1, keepdim=True)  # centring: smaller norms, less cancellation
        sq = feats.pow(2).sum(-1)                          # B, N
        B, N, _ = feats.shape
        out = values.new_empty(values.shape)
        for b in range(B):
            f, s, v = feats[b], sq[b], values[b]
            for r0 in range(0, N, chunk):
                r1 = min(r0 + chunk, N)
                d2 = torch.addmm(s.unsqueeze(0), f[r0:r1], f.t(), alpha=-2.0)  # |f_j|^2 - 2 f_i.f_j
                kern = d2.add_(s[r0:r1].unsqueeze(1)).clamp_(min=0.0).mul_(-0.5).exp_()
                out[b, r0:r1] = kern @ v
        return out


class _DenseGaussianFilter(torch.autograd.Function):
    """``Y = W X``; ``dL/dX = W^T dL/dY = W dL/dY`` (W symmetric), recomputed in chunks."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, values: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(feats)
        ctx.chunk = chunk
        return _filter(feats, values, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (feats,) = ctx.saved_tensors
        return None, _filter(feats, grad, ctx.chunk), None


def dense_gaussian_filter(feats: torch.Tensor, values: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Exact dense Gaussian filter ``(W X)_bi = sum_j exp(-|f_bi - f_bj|^2 / 2) X_bj`` (self term included).

    ``feats`` (B, N, D) (already divided by the kernel widths, no grad), ``values`` (B, N, K)
    (differentiable). Returns (B, N, K) in float32 (float64 if an input is float64).
    """
    if feats.dim() != 3 or values.dim() != 3 or feats.shape[:2] != values.shape[:2]:
        raise ValueError(f"dense_gaussian_filter needs feats (B, N, D) and values (B, N, K), got "
                         f"{tuple(feats.shape)} and {tuple(values.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _DenseGaussianFilter.apply(feats.detach(), values, int(chunk))


def crf_features(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """Bilateral features (B, N, 5) = (x / sigma_xy, y / sigma_xy, R / s, G / s, B / s), ``s = sigma_rgb``.

    ``x`` is the column and ``y`` the row index (pixels of ``image``'s grid), row-major ``N = H * W``.
    """
    B, _, H, W = image.shape
    dtype = _float_dtype(image)
    ys, xs = torch.meshgrid(torch.arange(H, device=image.device, dtype=dtype),
                            torch.arange(W, device=image.device, dtype=dtype), indexing="ij")
    pos = torch.stack([xs, ys], dim=-1).reshape(1, H * W, 2).expand(B, -1, -1) / float(sigma_xy)
    rgb = image.detach().to(dtype).flatten(2).transpose(1, 2) / float(sigma_rgb)
    return torch.cat([pos, rgb], dim=-1)


def _downscale_map(x: torch.Tensor, scale: float, size: tuple[int, int], name: str) -> torch.Tensor:
    """(B, H, W) map at the original or at the downscaled size -> downscaled size (nearest)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(x.unsqueeze(1).to(_float_dtype(x)), scale_factor=scale, mode="nearest").squeeze(1)
    if tuple(y.shape[-2:]) != tuple(size):
        raise ValueError(f"{name} has spatial size {tuple(x.shape[-2:])}, expected the probs' size or {tuple(size)}")
    return y


def dense_crf_loss(probs: torch.Tensor, image: torch.Tensor, sigma_rgb: float = 15.0, sigma_xy: float = 100.0,
                   scale: float = 0.5, gate: torch.Tensor | None = None, roi: torch.Tensor | None = None,
                   chunk: int = 4096) -> torch.Tensor:
    """Dense-CRF (relaxed Potts) energy of soft segmentations, Tang et al. ECCV 2018, Sec. 3.

    ``probs`` (B, K, H, W) softmax outputs (with grad), ``image`` (B, 3, H, W) RGB in 0..255,
    ``gate`` (B, H, W) per-pixel weight (no grad; also accepted at the downscaled size, as
    :func:`energy_gate` with ``scale`` returns it), ``roi`` (B, H, W) 0/1. All are first
    downscaled by ``scale`` (``scale_factor``; image, gate, roi nearest; probs bilinear,
    ``align_corners=False``); ``sigma_xy`` is in pixels of the *original* resolution, so the
    kernel uses ``sigma_xy * scale`` on the downscaled grid. With ``S = probs * roi``::

        E = (1/B) sum_n sum_k sum_i g_ni S_nki (W_n (1 - S_nk))_i                     (Tang et al., Sec. 3)
        W_n,ij = exp(-|p_i - p_j|^2 / (2 (sigma_xy scale)^2) - |I_ni - I_nj|^2 / (2 sigma_rgb^2))

    ``g = 1`` when ``gate`` is None. The gradient is autograd's, i.e. the true gradient of
    ``E``; ``W`` is exact (dense), computed in chunks of ``chunk`` rows (O(chunk x N) memory),
    in float32 even under autocast. Returns a scalar (float32, float64 for float64 inputs);
    multiply by the method's weight (ToCo/SeCo: 1e-7 inside the loss, then 0.05).

    Relation to the releases (ToCo/SeCo ``DenseEnergyLoss``): they compute
    ``E_rel = -(1/B) sum_k S_k^T G W S_k`` with a custom backward ``-(2/B) G W S_k``. Since
    ``sum_k S_k = roi`` (softmax), ``E = (1/B) sum_i g_i roi_i (W 1)_i + E_rel``: with ``g = 1``
    the two differ by a constant (it depends on the image and ROI only) and both gradients are
    ``-(2/B) W S_k``. With a non-constant gate the extra term still carries no gradient to the
    logits, but the true gradient is ``-(1/B)(g * W S_k + W (g * S_k))`` rather than the
    release's ``-(2/B) g * W S_k``. The release's gate is reproduced by :func:`energy_gate`.
    Values also differ from the release by the permutohedral lattice's constant factor.
    """
    if probs.dim() != 4 or image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"dense_crf_loss needs probs (B, K, H, W) and image (B, 3, H, W), got "
                         f"{tuple(probs.shape)} and {tuple(image.shape)}")
    if probs.shape[0] != image.shape[0] or probs.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"probs {tuple(probs.shape)} and image {tuple(image.shape)} must share B, H, W")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    B = probs.shape[0]
    with _autocast_off(probs.device):
        dtype = _float_dtype(probs, image)
        P = probs.to(dtype)
        img = image.detach().to(dtype)
        if scale != 1.0:
            img = F.interpolate(img, scale_factor=scale, mode="nearest")
            P = F.interpolate(P, scale_factor=scale, mode="bilinear", align_corners=False)
        h, w = P.shape[-2:]
        S = P
        if roi is not None:
            S = S * _downscale_map(roi.detach(), scale, (h, w), "roi").to(dtype).unsqueeze(1)
        S = S.flatten(2).transpose(1, 2)                                   # B, N, K
        feats = crf_features(img, sigma_rgb, sigma_xy * scale)
        WX = dense_gaussian_filter(feats, 1.0 - S, chunk)                  # W (1 - S_k)
        left = S
        if gate is not None:
            g = _downscale_map(gate.detach(), scale, (h, w), "gate").to(dtype)
            left = S * g.flatten(1).unsqueeze(-1)
        return (left * WX).sum() / B


def spatial_kernel_mass(h: int, w: int, sigma: float) -> float:
    """Mean over the pixels of an ``h x w`` grid of ``sum_j exp(-|p_i - p_j|^2 / (2 sigma^2))``: the
    spatial part of a dense CRF kernel's row sums (exact; separable, so one 1-D sum per axis).
    Dividing the energy by ``N * mass`` makes it a per-pixel disagreement that does not depend on
    the resolution it is computed at."""
    def axis(n: int) -> float:
        d = torch.arange(n, dtype=torch.float64)
        return float(torch.exp(-(d[:, None] - d[None]) ** 2 / (2 * sigma ** 2)).sum(1).mean())

    return axis(h) * axis(w)


@torch.no_grad()
def energy_gate(probs: torch.Tensor, labels: torch.Tensor, roi: torch.Tensor | None = None,
                ignore_index: int = 255, scale: float = 1.0) -> torch.Tensor:
    """The release's per-pixel gate ``G`` of the energy loss (no grad).

    ``G = roi - max_k P_k`` on labelled pixels, ``G = 1`` where ``labels == ignore_index``,
    clipped at 0 (so inside the ROI: 1 - max prob on labelled pixels, 1 on ignored ones).
    ``probs`` (B, K, H, W), ``labels`` (B, H, W) int, ``roi`` (B, H, W) 0/1 (None = all 1).
    With ``scale < 1`` the gate is computed as released, on the downscaled tensors (probs
    bilinear ``align_corners=False``, labels and roi nearest); :func:`dense_crf_loss` accepts
    the gate at that size. Returns (B, h, w) float32 (float64 for float64 probs).
    """
    dtype = _float_dtype(probs)
    P = probs.detach().to(dtype)
    lab = labels.detach().to(dtype)
    r = torch.ones_like(lab) if roi is None else roi.detach().to(dtype)
    if scale != 1.0:
        P = F.interpolate(P, scale_factor=scale, mode="bilinear", align_corners=False)
        lab = F.interpolate(lab.unsqueeze(1), scale_factor=scale, mode="nearest").squeeze(1)
        r = F.interpolate(r.unsqueeze(1), scale_factor=scale, mode="nearest").squeeze(1)
    g = r - P.amax(dim=1)
    g = torch.where(lab == float(ignore_index), torch.ones_like(g), g)
    return g.clamp_min(0.0)
