"""Multi-scale deformable attention in pure PyTorch (no compiled extension).

References
----------
* Deformable DETR: Zhu, Su, Lu, Li, Wang, Dai, "Deformable DETR: Deformable Transformers
  for End-to-End Object Detection", ICLR 2021 (multi-scale deformable attention: Sec. 4.1,
  Eq. 3; initialisation: Appendix A.2).
* Mask2Former: Cheng, Misra, Schwing, Kirillov, Girdhar, "Masked-attention Mask Transformer
  for Universal Image Segmentation", CVPR 2022 (uses it in its pixel decoder, Sec. 4.1).

Each query attends to ``n_points`` sampled locations per head and per feature level, placed
at a reference point plus learned offsets; sampled values (bilinear, zero outside the map)
are mixed with attention weights normalised jointly over levels and points:

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x^l(phi_l(p_q) + dp_mlqk) ]

The sampling core :func:`ms_deform_attn` follows the reference PyTorch path of the public
release (``ms_deform_attn_core_pytorch``): one ``grid_sample`` per level, vectorised over
batch, heads, queries and points. It is the same computation as the CUDA kernel up to
floating-point summation order, and it runs on any device / dtype.

Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
``output_proj``) match the public Deformable-DETR / Mask2Former modules, so their
``state_dict`` entries load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSDeformAttn", "ms_deform_attn"]


def _shapes_list(spatial_shapes: torch.Tensor) -> list[tuple[int, int]]:
    # One host sync for the (tiny) shape table instead of one per level.
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention sampling + weighted sum (Deformable DETR Eq. 3, inner sum).

    Args:
        value: ``(N, S, M, D)`` per-head values of all levels flattened row-major and
            concatenated, ``S = sum_l H_l * W_l``.
        spatial_shapes: ``(L, 2)`` integer ``(H_l, W_l)`` per level.
        level_start_index: ``(L,)`` offsets of each level in ``S``. Levels are taken to be
            contiguous in ``spatial_shapes`` order (as everywhere in Deformable DETR); the
            argument is accepted for API compatibility with the CUDA op and not needed here.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` in ``[0, 1]``
            (``0`` / ``1`` = outer edges of the map, pixel centres at ``(i + 0.5) / W``);
            locations outside read zeros.
        attention_weights: ``(N, Lq, M, L, P)``, normalised over ``(L, P)`` by the caller.

    Returns:
        ``(N, Lq, M * D)`` in ``value.dtype``.

    Sampling runs in float32 (float64 if ``value`` is float64): under AMP the locations
    would otherwise be rounded to bfloat16, whose 8-bit mantissa is off by up to half a
    pixel on a 128-wide map; the result is cast back to ``value.dtype``.
    """
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = _shapes_list(spatial_shapes)
    if len(shapes) != n_levels:
        raise ValueError(f"{len(shapes)} spatial shapes for {n_levels} sampling levels")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial shapes cover {sum(h * w for h, w in shapes)} positions, value has {s}")
    out_dtype = value.dtype
    work = torch.float64 if value.dtype == torch.float64 else torch.float32
    # grid_sample is on autocast's float32 list anyway; disabling autocast keeps the dtypes
    # here explicit rather than dependent on the caller's context.
    with torch.autocast(device_type=value.device.type, enabled=False):
        value = value.to(work)
        # grid_sample with align_corners=False maps -1 / +1 to the outer edges, i.e. the
        # same convention as [0, 1] locations.
        grids = (2 * sampling_locations.to(work) - 1)
        values_per_level = value.split([h * w for h, w in shapes], dim=1)
        sampled = []
        for lvl, (h, w) in enumerate(shapes):
            # (N, H*W, M, D) -> (N*M, D, H, W): heads become batch entries of grid_sample.
            v = values_per_level[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
            # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2): queries x points form the output "image".
            g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
            sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
        # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P) and summed over levels x points.
        stacked = torch.stack(sampled, dim=-2).flatten(-2)
        weights = attention_weights.to(work).transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
        out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR Sec. 4.1, Eq. 3).

    Args:
        d_model: embedding width (256 in Deformable DETR / Mask2Former).
        n_levels: number of feature levels attended (3 in Mask2Former's pixel decoder).
        n_heads: attention heads; ``d_model`` must be divisible by it.
        n_points: sampling points per head per level (4).

    ``forward(query (N, Lq, C), reference_points, input_flatten (N, S, C),
    input_spatial_shapes (L, 2), input_level_start_index (L,), input_padding_mask=None
    (N, S) bool, True = padding) -> (N, Lq, C)``.

    ``reference_points`` is ``(N, Lq, L, 2)`` normalised ``(x, y)`` in ``[0, 1]`` per level
    (offsets are in pixels of each level, i.e. divided by ``(W_l, H_l)``), or
    ``(N, Lq, L, 4)`` boxes ``(cx, cy, w, h)`` as in Deformable DETR's two-stage decoder
    (offsets are then in units of half the box size divided by ``n_points``).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation (Appendix A.2 and the public release)."""
        # Offsets start independent of the query (zero weight); the bias places head h's
        # points on the ray at angle 2*pi*h/M, point k at distance k+1 (in pixels of each
        # level, direction scaled so its larger coordinate is 1), so that the heads start
        # with distinct, growing receptive fields instead of all sampling the reference.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1).to(self.sampling_offsets.bias.dtype))
        # Zero attention logits: uniform weights over all levels x points at the start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor | None,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        shapes = input_spatial_shapes
        if int((shapes[:, 0] * shapes[:, 1]).sum()) != s:
            raise ValueError("input_spatial_shapes do not match input_flatten's length")
        m, lv, p = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # Padded positions contribute nothing, whatever bilinear weight they get.
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)

        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        # Softmax jointly over levels x points (Eq. 3: sum_l sum_k A = 1), in at least float32
        # so that reduced-precision logits under AMP do not lose the small differences.
        logits = self.attention_weights(query).view(n, lq, m, lv * p)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        weights = logits.softmax(-1).view(n, lq, m, lv, p).to(value.dtype)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l).
            normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points' last dim must be 2 or 4, got {reference_points.shape[-1]}")
        out = ms_deform_attn(value, shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)
