"""PAR (pixel-adaptive refinement) and the CAM -> pseudo-label refinement built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks.par import (
    PAR,
    dilated_neighbours,
    pseudo_labels_high_low,
    refine_cams_with_background,
)

OFFS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def par_reference(image, masks, dilations, num_iter, w1, w2):
    """Direct PAR: loops over pixels and neighbours, clamped coordinates, float64 numpy."""
    B, _, H, W = image.shape
    offs = [(dy * d, dx * d, (math.sqrt(2) if dy and dx else 1.0) * d) for d in dilations for dy, dx in OFFS]
    N = len(offs)
    p = np.array([o[2] for o in offs])
    prho = _softmax(-(p / (p.std(ddof=1) + 1e-8) / w1) ** 2)
    A = np.zeros((B, N, H, W))
    nbr = np.zeros((H, W, N, 2), dtype=int)
    for i in range(H):
        for j in range(W):
            for n, (oy, ox, _) in enumerate(offs):
                nbr[i, j, n] = (min(max(i + oy, 0), H - 1), min(max(j + ox, 0), W - 1))
    for b in range(B):
        for i in range(H):
            for j in range(W):
                vals = np.stack([image[b, :, nbr[i, j, n, 0], nbr[i, j, n, 1]] for n in range(N)], 1)  # 3 x N
                sigma = vals.std(axis=1, ddof=1)
                kappa = -((np.abs(vals - image[b, :, i, j, None]) / (sigma[:, None] + 1e-8) / w1) ** 2).mean(0)
                A[b, :, i, j] = _softmax(kappa) + w2 * prho
    M = masks.copy()
    for _ in range(num_iter):
        new = np.zeros_like(M)
        for b in range(B):
            for i in range(H):
                for j in range(W):
                    for n in range(N):
                        new[b, :, i, j] += A[b, n, i, j] * M[b, :, nbr[i, j, n, 0], nbr[i, j, n, 1]]
        M = new
    return A, M


def test_par_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 7, 9, generator=g, dtype=torch.float64)
    image[:, :, :, 5:] += 0.5  # an edge, so the affinities are far from uniform
    masks = torch.rand(2, 2, 7, 9, generator=g, dtype=torch.float64)
    par = PAR(dilations=(1, 2, 4, 8, 12, 24), num_iter=10, w1=0.3, w2=0.01)
    A_ref, M_ref = par_reference(image.numpy(), masks.numpy(), par.dilations, par.num_iter, par.w1, par.w2)
    A = par.affinity(image)
    assert A.dtype == torch.float64 and A.shape == (2, 48, 7, 9)
    np.testing.assert_allclose(A.numpy(), A_ref, atol=1e-10)
    out = par(image, masks)
    np.testing.assert_allclose(out.numpy(), M_ref, atol=1e-6, rtol=0)
    # neighbour order: dilation-major, TL T TR L R BL B BR, replicate padding
    nb = dilated_neighbours(image, (2,))
    assert torch.equal(nb[:, :, 0, 3, 4], image[:, :, 1, 2])
    assert torch.equal(nb[:, :, 4, 3, 8], image[:, :, 3, 8])   # R of the last column: clamped
    assert torch.equal(nb[:, :, 6, 6, 0], image[:, :, 6, 0])   # B of the last row: clamped


def test_par_constant_image_gives_uniform_image_term():
    par = PAR()
    image = torch.full((1, 3, 20, 24), 0.4)
    A = par.affinity(image)
    pos = par.position_weights()
    # constant image: |I_n - I_c| = 0 -> kappa = 0 -> image softmax = 1/48; position term is not uniform
    expected = 1.0 / 48 + par.w2 * pos
    assert torch.allclose(A, expected.view(1, 48, 1, 1).expand_as(A), atol=1e-7)
    assert torch.allclose(A.sum(1), torch.full((1, 20, 24), 1 + par.w2), atol=1e-6)
    assert pos[0] < pos[1] and pos[:8].sum() > pos[8:].sum()  # closer / axial neighbours weigh more
    masks = torch.full((1, 2, 20, 24), 0.3)
    masks[:, 1] = 0.8
    out = par(image, masks)
    factor = (1 + par.w2) ** par.num_iter
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 0.3 * factor), atol=1e-6)
    assert torch.allclose(out[:, 1], torch.full_like(out[:, 1], 0.8 * factor), atol=1e-6)


def test_par_resizes_masks_align_corners_true():
    g = torch.Generator().manual_seed(1)
    par = PAR(num_iter=2)
    image = torch.rand(2, 3, 16, 20, generator=g)
    small = torch.rand(2, 3, 8, 10, generator=g)
    big = F.interpolate(small, size=(16, 20), mode="bilinear", align_corners=True)
    assert torch.allclose(par(image, small), par(image, big), atol=1e-6)


def _two_region(H=32, W=32, edge=16):
    g = torch.Generator().manual_seed(2)
    image = torch.empty(1, 3, H, W)
    image[..., :edge] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)
    image[..., edge:] = torch.tensor([0.1, 0.3, 0.8]).view(1, 3, 1, 1)
    return (image + 0.02 * torch.rand(image.shape, generator=g)).clamp(0, 1)


def test_par_pulls_mask_back_across_colour_edge():
    H, W, edge = 32, 32, 16
    image = _two_region(H, W, edge)
    mask = torch.zeros(1, 1, H, W)
    mask[..., : edge + 4] = 1.0  # bleeds 4 columns into the other region

    def wrong_fraction(m):
        return (m[..., edge:].sum() / m.sum()).item()

    before = wrong_fraction(mask)
    par = PAR()
    out = par(image, mask)
    after = wrong_fraction(out)
    assert after < 0.75 * before
    # the bled columns fall towards the other region's mean; the true region keeps its value
    assert out[..., edge: edge + 4].max() < 0.35 and out[..., :edge].min() > 0.99
    # the same propagation on a constant image (no colour edge) spreads the bleed further
    blurred = wrong_fraction(par(torch.full_like(image, 0.5), mask))
    assert blurred > before


def test_pseudo_labels_high_low_constant_cams():
    par = PAR()
    K, H, W = 4, 12, 14
    image = torch.full((4, 3, H, W), 0.5)
    cams = torch.zeros(4, K, H, W)
    tags = torch.zeros(4, K)
    # image 0: class 2 at 0.9 (present), class 3 at 1.0 (absent), class 4 at 0.2 (present)
    cams[0, 1], cams[0, 2], cams[0, 3] = 0.9, 1.0, 0.2
    tags[0, [1, 3]] = 1
    # image 1: class 1 at 0.5 -> uncertain; image 2: class 4 at 0.1 -> background
    cams[1, 0], tags[1, 0] = 0.5, 1
    cams[2, 3], tags[2, 3] = 0.1, 1
    # image 3: no present class, absent class 1 at 0.95 -> background
    cams[3, 0] = 0.95
    lab = pseudo_labels_high_low(par, image, cams, tags, high=0.7, low=0.25)
    assert lab.dtype == torch.int64 and lab.shape == (4, H, W)
    assert (lab[0] == 2).all()
    assert (lab[1] == 255).all()
    assert (lab[2] == 0).all()
    assert (lab[3] == 0).all()
    # batch equals per image
    for b in range(4):
        one = pseudo_labels_high_low(par, image[b:b + 1], cams[b:b + 1], tags[b:b + 1])
        assert torch.equal(one, lab[b:b + 1])
    valid = torch.ones(4, H, W, dtype=torch.bool)
    valid[:, :, :3] = False
    lab_v = pseudo_labels_high_low(par, image, cams, tags, valid=valid)
    assert (lab_v[:, :, :3] == 255).all() and torch.equal(lab_v[:, :, 3:], lab[:, :, 3:])


def test_pseudo_labels_spatial_layout_and_absent_classes():
    # three colour stripes, CAM 0.9 / 0.5 / 0.1 per stripe; an absent class is strong everywhere
    g = torch.Generator().manual_seed(3)
    H, W = 24, 60
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    image = torch.empty(2, 3, H, W)
    cams = torch.zeros(2, 3, H, W)
    for s in range(3):
        image[..., 20 * s: 20 * (s + 1)] = colours[s].view(1, 3, 1, 1)
        cams[:, 0, :, 20 * s: 20 * (s + 1)] = (0.9, 0.5, 0.1)[s]
    image = image + 0.01 * torch.rand(image.shape, generator=g)
    cams[:, 2] = 1.0
    tags = torch.tensor([[1, 0, 0], [1, 1, 0]])
    lab = pseudo_labels_high_low(PAR(), image, cams, tags)
    assert (lab[..., :20] == 1).all()
    assert (lab[..., 20:40] == 255).all()
    assert (lab[..., 40:] == 0).all()
    assert not (lab == 3).any() and not (lab == 2).any()
    # the single-score version: absent classes removed, bg competes with present classes only
    one = refine_cams_with_background(PAR(), image, cams, tags, 0.7, out_size=(2 * H, 2 * W))
    assert one.shape == (2, 2 * H, 2 * W) and set(one.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("bg", [0.3, torch.tensor([0.3, 0.8])])
def test_refine_cams_absent_channels_stay_zero(bg):
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 10, 12, generator=g)
    cams = torch.rand(2, 5, 5, 6, generator=g)
    tags = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]])
    lab = refine_cams_with_background(PAR(num_iter=3), image, cams, tags, bg)
    allowed = [{0, 2, 5}, {0, 1}]
    for b in range(2):
        assert set(lab[b].unique().tolist()) <= allowed[b]
