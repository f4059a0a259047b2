"""IRN's network parts (Ahn, Cho & Kwak, CVPR 2019), shared by the ``irn`` refiner and CoBra.

* :class:`IRNet`: a *frozen* backbone (weights fixed, BatchNorm in eval mode, features
  detached) and the two trained branches over its multi-level features, both at stride 4:

  - :class:`BoundaryBranch` (IRN Sec. 3.2, "class boundary detection"): per level a
    1x1 conv + GroupNorm (+ upsampling to stride 4) + ReLU (32 channels each in the
    release), concatenated, then a 1x1 conv to one boundary logit map;
  - :class:`DisplacementBranch` (IRN Sec. 3.2, "displacement field"): the coarse
    levels (stride >= 8) are reduced (256 channels), brought to stride 8, fused by a
    1x1 conv and upsampled to stride 4, then fused with the stride-4 levels (64 / 128
    channels) into a 2-channel displacement field ``D`` (pixels of the stride-4 grid,
    ``(dy, dx)``), followed by the release's mean shift (a running mean of ``D`` tracked
    in training and subtracted in eval).

  Levels: the backbone's levels at ``feature_strides`` plus, with ``stem=True``, its first
  stage (stride 2) max-pooled 3x3/2 to stride 4 -- for ResNet exactly the release's
  ``stage1`` (conv1 + bn + relu + maxpool). ResNet-50 with ``output_stride=16`` and
  ``feature_strides=(4, 8, 16)`` then gives the release's five levels (64, 256, 512, 1024,
  2048 channels at strides 4, 4, 8, 16, 16); timm dilates ``layer4`` where the release
  uses stride 1 without dilation.

* Pairs and paths (IRN Eqs. 2-3): :func:`path_index` lists the offsets ``(dy, dx)``
  within a radius (one per unordered pair: ``dy > 0``, or ``dy == 0`` and ``dx > 0``) and
  for each the pixels of its line path (those closer than 1 to the segment, both ends
  included), grouped by path length like the release's ``PathIndex``;
  :func:`pair_indices` turns them into flat index tensors for an ``h x w`` grid (sources
  in rows ``[0, h - r + 1)``, columns ``[r - 1, w - r + 1)``, so every destination and
  path pixel is inside), cached per size and device.

* :func:`path_max_affinity`: ``a_ij = 1 - max_{k on the path i..j} B(x_k)`` (IRN Eq. 2),
  one gather + max per path length.

* Random walk (IRN Sec. 4): :func:`dense_affinity` (radius-``r`` affinities of every
  pixel, symmetric, with self loops, as the release's ``affinity_sparse2dense``),
  :func:`transition_matrix` (``T = D^-1 A^beta``, IRN Eq. 10, column-normalised as the
  release) and :func:`random_walk` (``vec(M*) = T^t vec(M * (1 - B))``, IRN Eq. 11, with
  ``t = 2^exp_times`` by repeated squaring as the release, or ``t`` products with the
  CAMs -- the same operator, far cheaper for large grids).

  Memory of the dense walk: ``N = h x w`` nodes of the stride-4 grid, two ``N x N`` fp32
  matrices per image at the peak (512 px: ``128 x 128 = 16384`` nodes -> 1 GiB per matrix,
  2 GiB per image: fine on a GPU; the ``irn`` method walks as many images of a batch at once
  as ``infer.rw_memory_gib`` allows). ``mode="iterate"`` costs ``2^exp_times * K * N^2``
  instead of ``exp_times * 2 N^3`` (squaring a 16384-node matrix 8 times is ~7e13 flops:
  about a second on a large GPU, hours on a CPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import LabelwiseError

__all__ = ["IRNet", "BoundaryBranch", "DisplacementBranch", "MeanShift", "PathIndex", "PairIndex", "path_index",
           "pair_indices", "path_max_affinity", "pair_labels", "pair_displacement", "dense_affinity",
           "transition_matrix", "random_walk", "walk_memory_bytes"]


def _gn(ch: int) -> nn.GroupNorm:
    """The release's GroupNorm sizes: 32 -> 4 groups, 64 -> 8, 128 and 256 -> 16."""
    return nn.GroupNorm(min(16, max(1, ch // 8)), ch)


def _resize(x: Tensor, size) -> Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                       align_corners=False)


class _Reduce(nn.Module):
    """1x1 conv (no bias) + GroupNorm, resized to ``size`` at call time, then ReLU (the release's order)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = _gn(cout)

    def forward(self, x: Tensor, size=None) -> Tensor:
        y = self.norm(self.conv(x))
        return F.relu(_resize(y, size) if size is not None else y)


class BoundaryBranch(nn.Module):
    """Levels -> one boundary logit map at the size of the first (stride-4) level."""

    def __init__(self, in_channels: Sequence[int], channels: int = 32):
        super().__init__()
        self.reduce = nn.ModuleList(_Reduce(c, channels) for c in in_channels)
        self.out = nn.Conv2d(channels * len(in_channels), 1, 1, bias=True)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        return self.out(torch.cat([m(f, size) for m, f in zip(self.reduce, feats)], dim=1))


class MeanShift(nn.Module):
    """The release's ``MeanShift``: tracks the batch mean of the displacement field in
    training (momentum 0.1, returns the input unchanged) and subtracts it in eval."""

    def __init__(self, channels: int = 2, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(x.detach().float().mean(dim=(0, 2, 3)), self.momentum)
            return x
        return x - self.running_mean.view(1, -1, 1, 1).to(x.dtype)


class DisplacementBranch(nn.Module):
    """Levels (strides given) -> 2-channel displacement field at stride 4.

    ``fine_channels``: widths of the stride-4 levels (the release: 64 for the stem, 128
    for ``layer1``; when there are fewer stride-4 levels the last ones are used);
    ``channels``: width of every coarse level and of the fusion convs (256).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], fine_channels: Sequence[int] = (64, 128),
                 channels: int = 256):
        super().__init__()
        self.fine = [i for i, s in enumerate(strides) if s == 4]
        self.coarse = [i for i, s in enumerate(strides) if s > 4]
        if not self.fine or not any(strides[i] == 8 for i in self.coarse):
            raise LabelwiseError(f"the IRN displacement branch needs feature levels at strides 4 and 8, got "
                                 f"{list(strides)}; include 4 and 8 in model.feature_strides")
        if len(fine_channels) < len(self.fine):
            raise LabelwiseError(f"config key 'model.disp_fine_channels' has {len(fine_channels)} entries but there "
                                 f"are {len(self.fine)} stride-4 levels; give one width per stride-4 level")
        fine_w = list(fine_channels)[-len(self.fine):]
        self.mid = next(i for i in self.coarse if strides[i] == 8)
        self.fine_reduce = nn.ModuleList(_Reduce(in_channels[i], w) for i, w in zip(self.fine, fine_w))
        self.coarse_reduce = nn.ModuleList(_Reduce(in_channels[i], channels) for i in self.coarse)
        self.fuse_coarse = _Reduce(channels * len(self.coarse), channels)
        self.fuse = _Reduce(sum(fine_w) + channels, channels)
        self.out = nn.Conv2d(channels, 2, 1, bias=False)
        self.mean_shift = MeanShift(2)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        size4 = feats[self.fine[0]].shape[-2:]
        size8 = feats[self.mid].shape[-2:]
        coarse = torch.cat([m(feats[i], size8) for m, i in zip(self.coarse_reduce, self.coarse)], dim=1)
        up = self.fuse_coarse(coarse, size4)
        fine = [m(feats[i], size4) for m, i in zip(self.fine_reduce, self.fine)]
        return self.mean_shift(self.out(self.fuse(torch.cat(fine + [up], dim=1))))


class IRNet(nn.Module):
    """Frozen backbone + boundary and displacement branches (see the module docstring).

    ``forward(images B x 3 x H x W in [0, 1])`` -> ``(boundary logits B x 1 x h x w,
    displacement B x 2 x h x w)`` with ``h, w`` the stride-4 size of the input; ``H`` and
    ``W`` must be multiples of :attr:`size_divisor` (:meth:`predict_maps` pads any size).
    """

    def __init__(self, backbone: str = "resnet50", *, pretrained: bool = True, weights: str | None = None,
                 feature_strides: Sequence[int] = (4, 8, 16), output_stride: int = 16, stem: bool = True,
                 edge_channels: int = 32, disp_fine_channels: Sequence[int] = (64, 128), disp_channels: int = 256):
        super().__init__()
        from labelwise.modeling.backbones import create_backbone

        kw = {"output_stride": int(output_stride)} if output_stride else {}
        try:
            self.backbone = create_backbone(backbone, pretrained=pretrained and not weights, weights=weights,
                                            strides=sorted(set(int(s) for s in feature_strides)), **kw)
        except LabelwiseError as e:
            if "stride" in str(e):
                raise LabelwiseError(f"config key 'model.feature_strides' = {list(feature_strides)}: {e}") from None
            raise
        bb = self.backbone
        if bb.is_vit:
            raise LabelwiseError(f"backbone '{backbone}' is a ViT; IRN's branches read a CNN's multi-level "
                                 "features (e.g. resnet50, efficientnet_lite0)")
        self.backbone.requires_grad_(False)
        self.stem = bool(stem)
        chans, strides = list(bb.channels), list(bb.strides)
        if self.stem:
            info = bb.model.feature_info[0]
            if int(info["reduction"]) != 2:
                raise LabelwiseError(f"config key 'model.stem': backbone '{backbone}' has no first stage at stride 2 "
                                     f"(it is at {info['reduction']}); set model.stem=false")
            chans, strides = [int(info["num_chs"])] + chans, [4] + strides
        self.level_channels, self.level_strides = chans, strides
        self.size_divisor = max(32 if not output_stride else int(output_stride), max(strides))
        self.boundary = BoundaryBranch(chans, edge_channels)
        self.displacement = DisplacementBranch(chans, strides, disp_fine_channels, disp_channels)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics stay those of the pretrained weights
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        with torch.no_grad():  # the backbone is frozen: its features are detached (the release's .detach())
            out = self.backbone(images, return_blocks=(0,) if self.stem else ())
        feats = list(out.features)
        if self.stem:
            feats = [F.max_pool2d(out.blocks[0], 3, 2, 1)] + feats
        return [f.detach() for f in feats]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(images)
        return self.boundary(feats), self.displacement(feats)

    @torch.no_grad()
    def predict_maps(self, images: Tensor, flip: bool = True) -> tuple[Tensor, Tensor]:
        """Boundary probabilities ``B x h x w`` and displacement ``B x 2 x h x w`` for any input
        size (``h = ceil(H / 4)``): the input is padded bottom/right to a multiple of
        :attr:`size_divisor` with the backbone's mean colour; with ``flip`` the boundary
        logits of the flipped input are averaged in (the release's ``EdgeDisplacement``)."""
        H, W = images.shape[-2:]
        d = self.size_divisor
        ph, pw = (-H) % d, (-W) % d
        x = images
        if ph or pw:
            mean = self.backbone.pixel_mean.to(images.dtype)
            x = F.pad(images - mean, (0, pw, 0, ph)) + mean
        B = x.shape[0]
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        edge, disp = self(x)
        edge = edge[:, 0].float()
        if flip:
            edge = edge[:B] / 2 + edge[B:].flip(-1) / 2
        h, w = math.ceil(H / 4), math.ceil(W / 4)
        return torch.sigmoid(edge[:, :h, :w]), disp[:B, :, :h, :w].float()


# --------------------------------------------------------------------------- pairs and paths
@dataclass(frozen=True)
class PathIndex:
    """Offsets within ``radius`` and their line paths, grouped by path length (see module doc).

    ``offsets``: ``P x 2`` (dy, dx) in group order; ``groups[g]``: ``n_g x L_g x 2`` path
    pixels (offsets from the source) of the ``n_g`` offsets whose path has ``L_g`` pixels,
    destination first.
    """

    radius: int
    offsets: np.ndarray
    groups: tuple[np.ndarray, ...]

    @property
    def floor(self) -> int:
        return int(math.ceil(self.radius) - 1)


@functools.lru_cache(maxsize=16)
def path_index(radius: int) -> PathIndex:
    """The release's ``PathIndex.get_all_dir_paths`` (IRN Eq. 3: pairs with ``|x_i - x_j| < radius``)."""
    r = int(radius)
    if r < 2:
        raise LabelwiseError(f"IRN pair radius must be >= 2, got {radius}")
    dirs = [(0, x) for x in range(1, r)]
    dirs += [(y, x) for y in range(1, r) for x in range(-r + 1, r) if x * x + y * y < r * r]
    by_len: dict[int, list] = {}
    for dy, dx in dirs:  # construction only (a few hundred offsets), not a hot path
        n2 = dy * dy + dx * dx
        ys = np.arange(min(0, dy), max(0, dy) + 1)
        xs = np.arange(min(0, dx), max(0, dx) + 1)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        keep = (dy * xx - dx * yy) ** 2 / n2 < 1  # distance to the line through 0 and (dy, dx) below 1
        coords = np.stack([yy[keep], xx[keep]], 1)
        coords = coords[np.argsort(-(np.abs(coords[:, 0]) + np.abs(coords[:, 1])), kind="stable")]
        by_len.setdefault(len(coords), []).append(coords)
    groups = tuple(np.asarray(by_len[k], dtype=np.int64) for k in sorted(by_len))
    offsets = np.concatenate([g[:, 0] for g in groups], 0)
    return PathIndex(r, offsets, groups)


@dataclass
class PairIndex:
    """Flat indices of the pairs of an ``h x w`` grid: ``src`` (n), ``dst`` (P x n), and per path
    length ``paths[g]`` (n_g x L_g x n); ``offsets`` (P x 2 float, (dy, dx)) on the device."""

    h: int
    w: int
    src: Tensor
    dst: Tensor
    paths: list[Tensor]
    offsets: Tensor


_PAIR_CACHE: dict = {}


def pair_indices(radius: int, h: int, w: int, device: torch.device | str = "cpu") -> PairIndex:
    """Index tensors of :func:`path_index` ``(radius)`` on an ``h x w`` grid (cached: 4 sizes/devices)."""
    key = (int(radius), int(h), int(w), str(torch.device(device)))
    hit = _PAIR_CACHE.get(key)
    if hit is not None:
        return hit
    pi = path_index(radius)
    rf = pi.floor
    ch, cw = h - rf, w - 2 * rf
    if ch < 1 or cw < 1:
        raise LabelwiseError(f"IRN pairs of radius {radius} need a grid of at least {rf + 1}x{2 * rf + 1} "
                             f"(stride 4), got {h}x{w}; use larger crops or a smaller loss.radius")
    dev = torch.device(device)
    ys, xs = torch.meshgrid(torch.arange(ch, device=dev), torch.arange(rf, rf + cw, device=dev), indexing="ij")
    src = (ys * w + xs).reshape(-1)
    paths = []
    for g in pi.groups:
        off = torch.as_tensor(g[..., 0] * w + g[..., 1], device=dev)  # n_g x L_g
        paths.append(src.view(1, 1, -1) + off.unsqueeze(-1))
    dst = torch.cat([p[:, 0] for p in paths], 0)
    out = PairIndex(h, w, src, dst, paths, torch.as_tensor(pi.offsets, dtype=torch.float32, device=dev))
    if len(_PAIR_CACHE) >= 4:
        _PAIR_CACHE.pop(next(iter(_PAIR_CACHE)))
    _PAIR_CACHE[key] = out
    return out


def path_max_affinity(boundary: Tensor, index: PairIndex) -> Tensor:
    """IRN Eq. 2: ``a_ij = 1 - max_{k in path(i, j)} B(x_k)``.

    ``boundary``: ``B x h x w`` (or ``B x 1 x h x w``) probabilities; returns ``B x P x n``
    (pairs in the order of ``index.dst``).
    """
    b = boundary.reshape(boundary.shape[0], -1)
    out = []
    for p in index.paths:  # one gather per path length (a handful), as the release
        vals = b.index_select(1, p.reshape(-1)).view(b.shape[0], *p.shape)
        out.append(1.0 - vals.amax(dim=2))
    return torch.cat(out, dim=1)


def pair_labels(label: Tensor, index: PairIndex, ignore_index: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """IRN Eq. 4: ``(bg_pos, fg_pos, neg)`` boolean ``B x P x n`` from a stride-4 label map
    ``B x h x w`` (pairs touching ``ignore_index`` are in none of them)."""
    flat = label.reshape(label.shape[0], -1)
    ls = flat[:, index.src].unsqueeze(1)
    ld = flat[:, index.dst.reshape(-1)].view(flat.shape[0], *index.dst.shape)
    valid = (ls != ignore_index) & (ld != ignore_index)
    eq = ls == ld
    pos = eq & valid
    return pos & (ls == 0), pos & (ls > 0), ~eq & valid


def pair_displacement(disp: Tensor, index: PairIndex) -> Tensor:
    """IRN Eq. 6: ``delta(i, j) = D(x_i) - D(x_j)`` for every pair: ``B x 2 x P x n``."""
    flat = disp.reshape(disp.shape[0], disp.shape[1], -1)
    ds = flat[:, :, index.src].unsqueeze(2)
    dd = flat[:, :, index.dst.reshape(-1)].view(flat.shape[0], flat.shape[1], *index.dst.shape)
    return ds - dd


# --------------------------------------------------------------------------- random walk
def dense_affinity(boundary: Tensor, radius: int = 5) -> Tensor:
    """Symmetric ``B x N x N`` affinity of an ``h x w`` boundary map (``N = h w``): IRN Eq. 2
    for every pair within ``radius``, 1 on the diagonal, 0 elsewhere.

    As the release's ``propagate_to_edge``: the map is padded with boundary 1 (left,
    right and bottom by ``radius - 1``) so that every pixel is a source; a pair reaching
    into the padding has affinity 0 and is dropped.
    """
    B, h, w = boundary.shape
    pi = path_index(radius)
    rf = pi.floor
    padded = F.pad(boundary.unsqueeze(1), (rf, rf, 0, rf), value=1.0)[:, 0]
    index = pair_indices(radius, h + rf, w + 2 * rf, boundary.device)
    aff = path_max_affinity(padded, index)  # B x P x (h w): the sources are exactly the unpadded grid
    N = h * w
    off = torch.as_tensor(pi.offsets, device=boundary.device)
    ys = torch.arange(h, device=boundary.device).view(1, h, 1)
    xs = torch.arange(w, device=boundary.device).view(1, 1, w)
    ty = ys + off[:, 0].view(-1, 1, 1)
    tx = xs + off[:, 1].view(-1, 1, 1)
    inside = ((ty < h) & (tx >= 0) & (tx < w)).reshape(len(off), N)  # P x N
    src = torch.arange(N, device=boundary.device).expand(len(off), N)
    dst = (ty.clamp(max=h - 1) * w + tx.clamp(0, w - 1)).reshape(len(off), N)
    vals = aff * inside.to(aff.dtype)  # a pair leaving the image adds 0 (and its path max is 1 anyway)
    A = boundary.new_zeros(B, N * N)
    A.index_add_(1, (src * N + dst).reshape(-1), vals.reshape(B, -1))  # each unordered pair once
    A = A.view(B, N, N)
    A = A + A.transpose(1, 2)
    A.diagonal(dim1=1, dim2=2).add_(1.0)  # self loops (in place: no N x N identity)
    return A


def transition_matrix(affinity: Tensor, beta: float = 10.0, *, inplace: bool = False) -> Tensor:
    """IRN Eq. 10: ``T = D^-1 A^beta`` (Hadamard power). As the release, normalised over
    dim -2 (columns), so that ``x @ T`` averages each node's neighbours for row vectors ``x``.
    ``inplace`` overwrites ``affinity`` (one N x N matrix less at the peak)."""
    s = affinity.pow_(beta) if inplace else affinity.pow(beta)
    return s.div_(s.sum(dim=-2, keepdim=True))


def walk_memory_bytes(n_nodes: int, mode: str = "square") -> int:
    """Peak bytes of one image's random walk: two fp32 ``N x N`` matrices (building ``A + A^T``;
    ``T`` and ``T @ T`` while squaring), plus the pair gather (small next to them)."""
    return 2 * 4 * n_nodes * n_nodes


def random_walk(cams: Tensor, boundary: Tensor, *, beta: float = 10.0, exp_times: int = 8, radius: int = 5,
                mode: str = "square") -> Tensor:
    """IRN Eq. 11: ``vec(M*_c) = T^t vec(M_c * (1 - B))`` with ``t = 2^exp_times``.

    ``cams``: ``B x K x h x w``; ``boundary``: ``B x h x w`` probabilities on the same grid.
    ``mode="square"``: ``T`` squared ``exp_times`` times, then one product (the release);
    ``"iterate"``: ``2^exp_times`` products ``x <- x T`` (the same result up to rounding).
    Returns ``B x K x h x w`` (unnormalised).
    """
    B, K, h, w = cams.shape
    if K == 0:
        return cams.float()
    T = transition_matrix(dense_affinity(boundary.float(), radius), beta, inplace=True)
    x = (cams.float() * (1.0 - boundary.float()).unsqueeze(1)).reshape(B, K, h * w)
    if mode == "square":
        for _ in range(int(exp_times)):
            T = torch.bmm(T, T)
        x = torch.bmm(x, T)
    elif mode == "iterate":
        for _ in range(2 ** int(exp_times)):
            x = torch.bmm(x, T)
    else:
        raise ValueError(f"random_walk mode must be 'square' or 'iterate', got {mode!r}")
    return x.view(B, K, h, w)
