"""Contrastive losses (labelwise.blocks.contrastive): references, mechanisms, AMP safety."""

import math

import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks import info_nce, masked_info_nce, select_hard_negatives, supcon_loss, topk_mask


def _ref_masked(a, c, pos, neg, t, pos_in_denom):
    """Loop reference of the documented formulas (mean over anchors with positives)."""
    losses = []
    for i in range(a.shape[0]):
        P = [j for j in range(c.shape[0]) if pos[i, j]]
        Nn = [k for k in range(c.shape[0]) if neg[i, k] and not pos[i, k]]
        if not P:
            continue
        s = lambda j: math.exp(float(a[i] @ c[j]) / t)  # noqa: E731
        terms = []
        for j in P:
            den = sum(s(k) for k in (P + Nn)) if pos_in_denom else s(j) + sum(s(k) for k in Nn)
            terms.append(-math.log(s(j) / den))
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def test_masked_info_nce_matches_hand_written_3x3():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    c = torch.tensor([[0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])
    pos = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    neg = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    t = 0.5
    # anchor 0, SupCon-style denominator: -log(e^{1.6} / (e^{1.6} + e^{-2} + e^{0}))
    e = math.exp
    l0 = -math.log(e(1.6) / (e(1.6) + e(-2.0) + e(0.0)))
    s20, s21, s22 = 0.96 / t, -0.6 / t, -0.8 / t
    l2 = 0.5 * (-math.log(e(s20) / (e(s20) + e(s21) + e(s22))) - math.log(e(s21) / (e(s20) + e(s21) + e(s22))))
    got = masked_info_nce(a, c, pos, neg, t)
    assert abs(got.item() - (l0 + l2) / 2) < 1e-5  # anchor 1 (no positive) excluded
    assert abs(got.item() - _ref_masked(a, c, pos, neg, t, True)) < 1e-5
    # CoBra Eq. 1: each positive only with the negatives
    l2b = 0.5 * (-math.log(e(s20) / (e(s20) + e(s22))) - math.log(e(s21) / (e(s21) + e(s22))))
    got_b = masked_info_nce(a, c, pos, neg, t, positives_in_denominator=False)
    assert abs(got_b.item() - (l0 + l2b) / 2) < 1e-5
    # reductions
    per = masked_info_nce(a, c, pos, neg, t, reduction="none")
    assert per[1] == 0 and abs(per[0].item() - l0) < 1e-5
    assert abs(masked_info_nce(a, c, pos, neg, t, reduction="sum").item() - (l0 + l2)) < 1e-5
    assert abs(masked_info_nce(a, c, pos, neg, t, reduction="pair_mean").item() - (l0 + 2 * l2) / 3) < 1e-5


def test_masked_info_nce_random_vs_reference_both_modes():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    c = F.normalize(torch.randn(9, 5, generator=g), dim=1)
    pos = torch.rand(6, 9, generator=g) < 0.3
    neg = torch.rand(6, 9, generator=g) < 0.6
    for mode in (True, False):
        got = masked_info_nce(a, c, pos, neg, 0.2, positives_in_denominator=mode)
        assert abs(got.item() - _ref_masked(a, c, pos, neg, 0.2, mode)) < 1e-4


def test_pulling_positives_together_lowers_loss_and_training_does_it():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    base = F.normalize(torch.randn(3, 16), dim=1)
    tight = base[labels] + 0.05 * torch.randn(8, 16)
    loose = base[labels] + 1.0 * torch.randn(8, 16)
    assert supcon_loss(tight, labels, 0.1) < supcon_loss(loose, labels, 0.1)
    # negatives pushed apart: same within-class spread, classes made more distinct
    mixed = F.normalize(base[labels] + 0.3 * torch.randn(8, 16), dim=1)
    far = F.normalize(3 * base[labels] + 0.3 * torch.randn(8, 16), dim=1)  # same noise scale, larger class separation
    assert supcon_loss(far, labels, 0.1) < supcon_loss(mixed, labels, 0.1)
    # a few gradient steps on the features decrease the loss and raise same-class cosine
    x = torch.randn(8, 16, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.5)
    same = (labels[:, None] == labels[None]) & ~torch.eye(8, dtype=torch.bool)

    def pos_cos():
        z = F.normalize(x.detach(), dim=1)
        return (z @ z.t())[same].mean().item()

    l0, c0 = supcon_loss(x, labels, 0.1).item(), pos_cos()
    for _ in range(30):
        opt.zero_grad()
        supcon_loss(x, labels, 0.1).backward()
        opt.step()
    assert supcon_loss(x, labels, 0.1).item() < 0.5 * l0 and pos_cos() > c0 + 0.2


def test_supcon_matches_reference_with_ignore_and_views():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(7, 4, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, -1, 3])  # 3 has no partner -> excluded; -1 ignored
    z = F.normalize(f, dim=1)
    valid = labels != -1
    eye = torch.eye(7, dtype=torch.bool)
    pair_valid = valid[:, None] & valid[None] & ~eye
    pos = (labels[:, None] == labels[None]) & pair_valid
    ref = _ref_masked(z, z, pos, pair_valid, 0.3, True)
    assert abs(supcon_loss(f, labels, 0.3).item() - ref) < 1e-5
    # the ignored sample does not affect the loss
    f2 = f.clone()
    f2[5] = 100 * torch.randn(4, generator=g)
    assert abs(supcon_loss(f2, labels, 0.3).item() - ref) < 1e-5
    # two views: the two views of each sample are positives of each other
    v = torch.stack([f, f + 0.01], dim=1)
    lv = supcon_loss(v, torch.arange(7), 0.3)
    assert lv.item() < supcon_loss(torch.stack([f, torch.randn(7, 4, generator=g)], 1), torch.arange(7), 0.3).item()


def test_info_nce_reference_queue_and_in_batch():
    g = torch.Generator().manual_seed(2)
    q, k, queue = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(10, 8, generator=g)
    t = 0.2
    qn, kn, nn_ = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    ref = sum(-torch.log_softmax(torch.cat([(qn[i] @ kn[i])[None], nn_ @ qn[i]]) / t, 0)[0] for i in range(4)) / 4
    assert abs(info_nce(q, k, queue, t).item() - ref.item()) < 1e-5
    # per-query negatives (N, K, D) with the same queue give the same loss
    assert abs(info_nce(q, k, queue[None].expand(4, -1, -1), t).item() - ref.item()) < 1e-5
    # in-batch: matching keys give a lower loss than unrelated keys
    assert info_nce(q, q + 0.01 * k, None, t) < info_nce(q, k, None, t)


def test_no_positive_anchor_gives_connected_zero_and_excluded():
    a = torch.randn(3, 4, requires_grad=True)
    c = torch.randn(5, 4)
    pos = torch.zeros(3, 5, dtype=torch.bool)
    loss = masked_info_nce(a, c, pos, ~pos, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert a.grad is not None and torch.all(a.grad == 0)
    # an anchor with positives but no negatives: finite, no NaN gradient (CoBra mode)
    a2 = torch.randn(2, 4, requires_grad=True)
    pos2 = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    neg2 = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    for mode in (True, False):
        a2.grad = None
        out = masked_info_nce(a2, c, pos2, neg2, 0.1, positives_in_denominator=mode)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(a2.grad).all()


@pytest.mark.parametrize("fn", ["masked", "supcon", "info_nce"])
def test_fp16_and_autocast_inputs_give_finite_gradients(fn):
    torch.manual_seed(3)
    # large-magnitude half inputs: sim / T would overflow fp16 (65504) if not upcast
    x = (torch.randn(6, 32) * 40).half().requires_grad_()
    y = (torch.randn(6, 32) * 40).half()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    if fn == "masked":
        pos = labels[:, None] == labels[None]
        loss = masked_info_nce(x, y, pos, ~pos, 0.07)
    elif fn == "supcon":
        loss = supcon_loss(x, labels, 0.07, normalize=False)
    else:
        loss = info_nce(x, y, None, 0.07, normalize=False)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
    # under CPU autocast (bf16 matmuls produce the features)
    lin = torch.nn.Linear(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lin(x.detach().float())
        assert feats.dtype == torch.bfloat16
        out = supcon_loss(feats, labels, 0.07)
    out.backward()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


def test_topk_mask_respects_validity_and_direction():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.4]])
    valid = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    m = topk_mask(s, 2, largest=True, valid=valid)
    assert m[0].tolist() == [False, False, True, True]  # 0.9 is invalid
    assert m[1].tolist() == [True, False, False, False]  # fewer valid than k
    b = topk_mask(s, 1, largest=False)
    assert b.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert not topk_mask(s, 0).any()
    assert topk_mask(s, 10).all()
    # hard negatives: most similar among negatives only
    neg = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    hn = select_hard_negatives(s, neg, 1)
    assert hn.tolist() == [[False, True, False, False], [False, False, True, False]]
