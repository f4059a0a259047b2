"""Query-wise self-distillation (OAP Eq. 1 / 7, DINO centring) and cropped bipartite matching."""

import pytest
import torch

from labelwise.blocks.matching import crop_masks_to_view, match_per_level
from labelwise.blocks.self_distill import self_distillation_loss, update_center


def test_self_distillation_equals_direct_eq1():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 16, generator=g, requires_grad=True)
    t = torch.randn(6, 16, generator=g)
    c = torch.randn(16, generator=g) * 0.1
    got = self_distillation_loss(s, t, c, teacher_temp=0.04, student_temp=0.1)
    want = 0.0
    for i in range(6):                                           # Eq. 1 pair by pair
        p_t = torch.exp((t[i] - c) / 0.04) / torch.exp((t[i] - c) / 0.04).sum()
        p_s = torch.exp(s[i] / 0.1) / torch.exp(s[i] / 0.1).sum()
        want = want - (p_t * torch.log(p_s)).sum()
    torch.testing.assert_close(got, want / 6)
    torch.testing.assert_close(self_distillation_loss(s, t, c, 0.04, 0.1, reduction="sum"), want)   # Eq. 7
    got.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # the loss falls when the student's code moves to the teacher's
    aligned = self_distillation_loss((t - c) / 0.04 * 0.1, t, c, 0.04, 0.1)
    assert float(aligned) < float(got.detach())
    empty = self_distillation_loss(s[:0], t[:0], c)
    assert float(empty) == 0.0 and empty.requires_grad


def test_update_center_follows_the_ema_formula():
    c = torch.zeros(4)
    t = torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0]])
    update_center(c, t, momentum=0.9)
    torch.testing.assert_close(c, 0.1 * t.mean(0))
    before = c.clone()
    update_center(c, t[:0], momentum=0.9)                       # no pairs this step: unchanged
    torch.testing.assert_close(c, before)


def test_crop_keeps_overlapping_masks_and_cuts_their_region():
    H = W = 16
    left = torch.zeros(H, W, dtype=torch.bool)
    left[:, :8] = True
    blob = torch.zeros(H, W, dtype=torch.bool)
    blob[2:6, 10:14] = True
    masks = torch.stack([left, blob])
    # the right half of the image: the left-half mask does not overlap it and is dropped
    out, keep = crop_masks_to_view(masks, (8, 0, 16, 16), (16, 8))
    assert keep.tolist() == [False, True]
    assert torch.equal(out[0] > 0.5, blob[:, 8:])
    # the full view at the same size is the mask itself; flipped view = mirrored mask
    out, keep = crop_masks_to_view(masks, (0, 0, 16, 16), (16, 16), flip=True)
    assert keep.all() and torch.equal(out > 0.5, masks.flip(-1))
    # an up-sampled view (4x4 region -> 8x8) of the blob is all foreground
    out, keep = crop_masks_to_view(masks, (10, 2, 14, 6), (8, 8))
    assert keep.tolist() == [False, True] and bool((out[0] > 0.5).all())


def test_matching_recovers_the_student_masks_within_each_level():
    g = torch.Generator().manual_seed(1)
    T = 6
    targets = (torch.rand(T, 12, 12, generator=g) < 0.3).float()
    t_level = torch.tensor([0, 0, 0, 1, 1, 1])
    perm = torch.tensor([4, 0, 5, 2, 3, 1, 0, 3])               # queries show target perm[q] (noise for 6, 7)
    q_level = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1])            # ... each of its own target's level
    logits = (targets[perm] * 2 - 1) * 10
    logits[6:] = torch.randn(2, 12, 12, generator=g)             # one extra query per level
    qi, ti = match_per_level(logits, q_level, targets, t_level)
    pairs = dict(zip(ti.tolist(), qi.tolist()))
    assert sorted(pairs) == list(range(T))
    for t, q in pairs.items():
        assert int(perm[q]) == t and int(q_level[q]) == int(t_level[t])
    # a semantic target can never go to an instance query, even when it would match it better
    q_level2 = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1])
    qi2, ti2 = match_per_level(logits, q_level2, targets, t_level)
    assert set(ti2.tolist()) == {3, 4, 5}


def test_match_per_level_refuses_predictions_and_targets_on_different_grids():
    """Point sampling indexes predictions and targets with the same flat indices: on different grids
    it would pair unrelated pixels, so the matcher stops with one line naming both sizes."""
    logits = torch.randn(4, 40, 40)
    targets = torch.rand(3, 160, 160)
    lv = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(40, 40\).*\(160, 160\)"):
        match_per_level(logits, lv, targets, torch.zeros(3, dtype=torch.long), num_points=100)
