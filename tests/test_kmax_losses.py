"""kMaX-DeepLab losses and matching (labelwise.blocks.kmax_losses): loop references of every
term, planted matchings, CoCal's fixed matching, mechanisms, query groups, AMP."""

import math

import pytest
import torch

from labelwise.blocks.kmax_losses import (
    KMAX_LOSS_WEIGHTS,
    fixed_match,
    group_softmax,
    kmax_losses,
    kmax_match,
    loss_aux_semantic,
)

H = W = 4
C = 3


def _mask(pixels, h=H, w=W):
    m = torch.zeros(h, w, dtype=torch.bool)
    for i in pixels:
        m[i // w, i % w] = True
    return m


def _case(seed=0, Q=4, D=5):
    """Two images. Image 0: classes 0, 2 and two unlabelled (ignore) pixels; image 1: classes
    1, 0, 2, the last one left unmatched by the given matches."""
    g = torch.Generator().manual_seed(seed)
    B = 2
    outputs = {
        "pred_masks": torch.randn(B, Q, H, W, generator=g),
        "pred_logits": torch.randn(B, Q, C + 1, generator=g),
        "pixel_feature": torch.nn.functional.normalize(torch.randn(B, D, H, W, generator=g), dim=1),
    }
    t0 = (torch.stack([_mask(range(8)), _mask(range(8, 14))]), torch.tensor([0, 2]))
    t1 = (torch.stack([_mask(range(5)), _mask(range(5, 12)), _mask(range(12, 16))]), torch.tensor([1, 0, 2]))
    matches = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([0, 2]), torch.tensor([0, 1]))]
    return outputs, [t0, t1], matches


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _probs(ml, b, group_sizes):
    """Loop softmax over the queries of each group: p[q][x]."""
    Q, P = ml.shape[1], ml.shape[2] * ml.shape[3]
    flat = ml[b].reshape(Q, P).double().tolist()
    p = [[0.0] * P for _ in range(Q)]
    start = 0
    for size in group_sizes:
        for x in range(P):
            col = _softmax([flat[q][x] for q in range(start, start + size)])
            for i, q in enumerate(range(start, start + size)):
                p[q][x] = col[i]
        start += size
    return p


def _ref_pq_terms(outputs, targets, matches, alpha=0.75, gamma=0.0, vw=1e-5, class_head=True):
    ml, cl = outputs["pred_masks"], outputs["pred_logits"]
    B, Q = ml.shape[:2]
    P = H * W
    cls_total, dice_total = 0.0, 0.0
    for b in range(B):
        p = _probs(ml, b, [Q])
        masks, classes = targets[b][0], targets[b][1]
        qmap = {int(q): int(t) for q, t in zip(*matches[b])}
        tmask = {q: masks[t].reshape(-1).tolist() for q, t in qmap.items()}
        lab = [any(tmask[q][x] for q in tmask) for x in range(P)]
        cls_sum, dice_sum = 0.0, 0.0
        for q in range(Q):
            sm = _softmax(cl[b, q].double().tolist())
            if q in qmap:
                t = [float(v) for v in tmask[q]]
                pp = [p[q][x] * lab[x] for x in range(P)]
                sim = sum(pp[x] * t[x] for x in range(P)) / ((sum(pp) + sum(t)) / 2 + 1e-5)
                w, y, a = max(sim, vw), int(classes[qmap[q]]), alpha
                v = max(sm[y], vw) if class_head else 1.0
                dice = 1 - (2 * sum(pp[x] * t[x] for x in range(P)) + 1) / (sum(pp) + sum(t) + 1)
                dice_sum += v * dice
            else:
                vr = sum(p[q][x] * (not lab[x]) for x in range(P)) / (sum(p[q]) + 1e-5)
                w, y, a = max(vr, vw), C, 1 - alpha
            ce = -math.log(sm[y]) * (1 - sm[y]) ** gamma
            cls_sum += a * w * ce
        cls_total += cls_sum / Q
        dice_total += dice_sum * alpha / Q
    return cls_total / B, dice_total / B


def _ref_mask(outputs, targets, matches, group_sizes=None):
    ml = outputs["pred_masks"]
    B, Q = ml.shape[:2]
    group_sizes = group_sizes or [Q]
    P = H * W
    total = 0.0
    for b in range(B):
        p = _probs(ml, b, group_sizes)
        qmap = {int(q): int(t) for q, t in zip(*matches[b])}
        s, n, start = 0.0, 0, 0
        for size in group_sizes:
            for x in range(P):
                hit = [q for q in range(start, start + size) if q in qmap and bool(targets[b][0][qmap[q]].reshape(-1)[x])]
                if hit:
                    s += -math.log(p[hit[0]][x])
                    n += 1
            start += size
        total += s / max(n, 1)
    return total / B


def _norm(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _pix_feats(outputs, b):
    f = outputs["pixel_feature"][b].double()
    return [_norm(f[:, x // W, x % W].tolist()) for x in range(H * W)]


def _seg_of(targets, b):
    masks = targets[b][0].reshape(targets[b][0].shape[0], -1)
    return [next((i for i in range(masks.shape[0]) if masks[i, x]), -1) for x in range(H * W)]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _ref_insdis_pixels(outputs, targets, tau):
    B = outputs["pred_masks"].shape[0]
    total = 0.0
    for b in range(B):
        f, seg = _pix_feats(outputs, b), _seg_of(targets, b)
        lab = [x for x in range(H * W) if seg[x] >= 0]
        s = 0.0
        for k in lab:
            lse = math.log(sum(math.exp(_dot(f[k], f[j]) / tau) for j in lab))
            pos = [j for j in lab if seg[j] == seg[k]]
            s += sum(lse - _dot(f[k], f[j]) / tau for j in pos) / len(pos)
        total += s / len(lab)
    return total / B


def _ref_insdis_means(outputs, targets, tau):
    B = outputs["pred_masks"].shape[0]
    total = 0.0
    for b in range(B):
        f, seg = _pix_feats(outputs, b), _seg_of(targets, b)
        M = targets[b][0].shape[0]
        raw = [[0.0] * len(f[0]) for _ in range(M)]
        for x in range(H * W):
            if seg[x] >= 0:
                raw[seg[x]] = [a + c for a, c in zip(raw[seg[x]], f[x])]
        means = [_norm(m) for m in raw]
        lab = [x for x in range(H * W) if seg[x] >= 0]
        s = 0.0
        for x in lab:
            logits = [_dot(f[x], means[i]) / tau for i in range(M)]
            s += -math.log(_softmax(logits)[seg[x]])
        total += s / len(lab)
    return total / B


# ---------------------------------------------------------------- loop references of each term

def test_pq_class_and_dice_equal_loop_reference():
    outputs, targets, matches = _case()
    got = kmax_losses(outputs, targets, matches, num_classes=C, weights=None, insdis_sample_k=4096)
    ref_cls, ref_dice = _ref_pq_terms(outputs, targets, matches)
    assert got["loss_pq_class"].dtype == torch.float32
    assert got["loss_pq_class"].item() == pytest.approx(ref_cls, rel=1e-5)
    assert got["loss_pq_dice"].item() == pytest.approx(ref_dice, rel=1e-5)
    # focal gamma and another alpha follow the same formula
    got2 = kmax_losses(outputs, targets, matches, num_classes=C, weights=None, focal_alpha=0.6, focal_gamma=2.0)
    ref_cls2, ref_dice2 = _ref_pq_terms(outputs, targets, matches, alpha=0.6, gamma=2.0)
    assert got2["loss_pq_class"].item() == pytest.approx(ref_cls2, rel=1e-5)
    assert got2["loss_pq_dice"].item() == pytest.approx(ref_dice2, rel=1e-5)


def test_mask_id_ce_equals_loop_reference_and_skips_unmatched_and_ignore():
    outputs, targets, matches = _case(seed=1)
    got = kmax_losses(outputs, targets, matches, num_classes=C, weights=None)["loss_mask"]
    assert got.item() == pytest.approx(_ref_mask(outputs, targets, matches), rel=1e-5)
    # logits on the skipped pixels (image 0: ignore pixels 14-15; image 1: unmatched segment 12-15)
    # do not change the loss
    o2 = {k: v.clone() for k, v in outputs.items()}
    o2["pred_masks"][0, :, 3, 2:] += torch.randn(4, 2)
    o2["pred_masks"][1, :, 3, :] += torch.randn(4, 4)
    got2 = kmax_losses(o2, targets, matches, num_classes=C, weights=None)["loss_mask"]
    assert got2.item() == pytest.approx(got.item(), rel=1e-6)


def test_instance_discrimination_equals_loop_reference_both_modes():
    outputs, targets, matches = _case(seed=2)
    # sample_k >= h * w: every labelled pixel is sampled, so the sampled loss is deterministic
    got = kmax_losses(outputs, targets, matches, num_classes=C, weights=None, insdis_sample_k=4096,
                      insdis_temperature=0.3)["loss_instdisc"]
    assert got.item() == pytest.approx(_ref_insdis_pixels(outputs, targets, 0.3), rel=1e-5)
    got_m = kmax_losses(outputs, targets, matches, num_classes=C, weights=None, insdis_mode="means",
                        insdis_temperature=0.5)["loss_instdisc"]
    assert got_m.item() == pytest.approx(_ref_insdis_means(outputs, targets, 0.5), rel=1e-5)
    # sub-sampling draws distinct labelled pixels, reproducibly with a generator
    a = kmax_losses(outputs, targets, matches, num_classes=C, insdis_sample_k=6,
                    generator=torch.Generator().manual_seed(3))["loss_instdisc"]
    b = kmax_losses(outputs, targets, matches, num_classes=C, insdis_sample_k=6,
                    generator=torch.Generator().manual_seed(3))["loss_instdisc"]
    assert torch.isfinite(a) and a.item() == b.item()


def test_aux_semantic_equals_loop_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, C, 4, 4, generator=g)
    label = torch.randint(0, C, (2, 4, 4), generator=g)
    label[0, 0, :3] = 255
    label[1, 2, 2] = 255
    ref = 0.0
    for b in range(2):
        terms = [-math.log(_softmax(logits[b, :, i, j].double().tolist())[int(label[b, i, j])])
                 for i in range(4) for j in range(4) if label[b, i, j] != 255]
        ref += sum(terms) / len(terms)
    ref /= 2
    assert loss_aux_semantic(logits, label).item() == pytest.approx(ref, rel=1e-5)
    # sampling every labelled pixel reproduces the plain loss; the weight multiplies
    assert loss_aux_semantic(logits, label, sample_k=4096).item() == pytest.approx(ref, rel=1e-5)
    assert loss_aux_semantic(logits, label, weight=2.0).item() == pytest.approx(2 * ref, rel=1e-5)
    # top-k mining keeps the hardest pixels: not below the plain mean
    assert loss_aux_semantic(logits, label, top_k_percent=0.25).item() >= ref
    # full-resolution label (7 x 7 = stride 2, corner aligned, as the port) is downsampled
    big = torch.full((2, 7, 7), 255, dtype=torch.long)
    big[:, ::2, ::2] = label
    assert loss_aux_semantic(logits, big).item() == pytest.approx(ref, rel=1e-5)


def test_weights_default_to_the_official_ones():
    outputs, targets, matches = _case(seed=5)
    raw = kmax_losses(outputs, targets, matches, num_classes=C, weights=None)
    wtd = kmax_losses(outputs, targets, matches, num_classes=C)
    assert set(raw) == {"loss_pq_class", "loss_pq_dice", "loss_mask", "loss_instdisc"}
    for k in raw:
        assert wtd[k].item() == pytest.approx(raw[k].item() * KMAX_LOSS_WEIGHTS[k], rel=1e-6)
    assert KMAX_LOSS_WEIGHTS == {"loss_pq_class": 3.0, "loss_pq_dice": 3.0, "loss_mask": 0.3,
                                 "loss_instdisc": 1.0, "loss_aux_semantic": 1.0}


def test_dictionary_mode_without_class_head():
    outputs, targets, matches = _case(seed=6)
    outputs.pop("pred_logits")
    got = kmax_losses(outputs, targets, matches, num_classes=C, weights=None)
    assert "loss_pq_class" not in got
    outputs["pred_logits"] = torch.zeros(2, 4, C + 1)  # only for the reference's signature
    _, ref_dice = _ref_pq_terms(outputs, targets, matches, class_head=False)
    assert got["loss_pq_dice"].item() == pytest.approx(ref_dice, rel=1e-5)


# ---------------------------------------------------------------- matching

def test_fixed_match_maps_each_target_to_its_class_component():
    _, targets, _ = _case()
    comp = torch.tensor([2, 0, 3])            # class -> component
    m = fixed_match(targets, comp)
    # image 0: classes [0, 2] -> components [2, 3]; image 1: classes [1, 0, 2] -> [0, 2, 3]
    assert m[0][0].tolist() == [2, 3] and m[0][1].tolist() == [0, 1]
    assert m[1][0].tolist() == [0, 2, 3] and m[1][1].tolist() == [0, 1, 2]
    for (q, t), tg in zip(m, targets):
        assert torch.equal(comp[tg[1][t]], q)
    # a class without component stays unmatched
    m2 = fixed_match(targets, [2, -1, 3])
    assert m2[1][0].tolist() == [2, 3] and m2[1][1].tolist() == [1, 2]
    # per-level maps (parts 0..2, objects offset by 3) with group ids
    parts = (torch.zeros(2, H, W, dtype=torch.bool), torch.tensor([1, 0]), torch.tensor([0, 0]))
    objs = (torch.zeros(3, H, W, dtype=torch.bool), torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1]))
    m3 = fixed_match([parts, objs], [torch.tensor([2, 0, 1]), torch.tensor([3, 4])])
    assert m3[0][0].tolist() == [0, 2] and m3[0][1].tolist() == [0, 1]
    assert m3[1][0].tolist() == [0, 3, 4] and m3[1][1].tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        fixed_match([(torch.zeros(2, H, W), torch.tensor([1, 1]))], comp)


def test_kmax_match_recovers_planted_permutation():
    Q, M = 6, 4
    perm = [4, 0, 5, 2]                         # target i <- query perm[i]
    masks = torch.stack([_mask(range(4 * i, 4 * i + 4)) for i in range(M)])
    classes = torch.tensor([2, 0, 1, 2])
    ml = torch.zeros(1, Q, H, W)
    cl = torch.zeros(1, Q, C + 1)
    for i, q in enumerate(perm):
        ml[0, q][masks[i]] = 8.0
        cl[0, q, classes[i]] = 5.0
    probs = group_softmax(ml)
    for logits in (cl, None):
        (q, t), = kmax_match(logits, probs, [(masks, classes)])
        assert sorted(zip(t.tolist(), q.tolist())) == sorted(enumerate(perm))
        assert q.tolist() == sorted(q.tolist())
    # equal masks: the class probability decides
    ml2 = torch.zeros(1, 2, H, W)
    ml2[0, :, 0] = 5.0
    cl2 = torch.zeros(1, 2, C + 1)
    cl2[0, 0, 1] = 4.0
    cl2[0, 1, 0] = 4.0
    (q, t), = kmax_match(cl2, group_softmax(ml2), [(masks[:1], torch.tensor([0]))])
    assert q.tolist() == [1] and t.tolist() == [0]


def test_kmax_match_within_groups():
    masks = torch.stack([_mask(range(8)), _mask(range(8, 16)), _mask(range(16))])
    groups_t = torch.tensor([0, 0, 1])
    ml = torch.randn(1, 5, H, W, generator=torch.Generator().manual_seed(7))
    probs = group_softmax(ml, [3, 2])
    (q, t), = kmax_match(None, probs, [(masks, torch.tensor([0, 1, 0]), groups_t)], groups=[3, 2])
    for qq, tt in zip(q.tolist(), t.tolist()):
        assert (qq < 3) == (groups_t[tt].item() == 0)
    assert sorted(t.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError):
        kmax_match(None, probs, [(masks, torch.tensor([0, 1, 0]))], groups=[3, 2])


# ---------------------------------------------------------------- mechanisms

def test_mask_id_loss_falls_when_matched_logits_rise_on_their_pixels():
    outputs, targets, matches = _case(seed=8)
    before = kmax_losses(outputs, targets, matches, num_classes=C)["loss_mask"].item()
    for b in range(2):
        for q, t in zip(*matches[b]):
            outputs["pred_masks"][b, q][targets[b][0][t]] += 1.0
    after = kmax_losses(outputs, targets, matches, num_classes=C)["loss_mask"].item()
    assert after < before


@pytest.mark.parametrize("mode", ["pixels", "means"])
def test_instance_discrimination_falls_when_segments_are_pulled_together(mode):
    outputs, targets, matches = _case(seed=9)
    kw = {"num_classes": C, "insdis_mode": mode, "insdis_sample_k": 4096}
    before = kmax_losses(outputs, targets, matches, **kw)["loss_instdisc"].item()
    f = outputs["pixel_feature"]
    for b in range(2):
        for m in targets[b][0]:
            mean = f[b][:, m].mean(1, keepdim=True)
            f[b][:, m] = torch.nn.functional.normalize(f[b][:, m] + 2.0 * mean, dim=0)
    after = kmax_losses(outputs, targets, matches, **kw)["loss_instdisc"].item()
    assert after < before


def test_groups_softmax_runs_within_each_group():
    g = torch.Generator().manual_seed(10)
    outputs = {"pred_masks": torch.randn(2, 5, H, W, generator=g)}
    parts = [_mask(range(6)), _mask(range(6, 16))]
    obj = [_mask(range(12))]
    targets, matches = [], []
    for _ in range(2):
        targets.append((torch.stack(parts + obj), torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1])))
        matches.append((torch.tensor([0, 2, 4]), torch.tensor([0, 1, 2])))
    got = kmax_losses(outputs, targets, matches, num_classes=2, groups=[3, 2], weights=None)
    assert got["loss_mask"].item() == pytest.approx(_ref_mask(outputs, targets, matches, [3, 2]), rel=1e-5)
    assert got["loss_mask"].item() != pytest.approx(_ref_mask(outputs, targets, matches, [5]), rel=1e-3)
    # adding a constant to a whole group's logits changes nothing (softmax within the group)
    o2 = {"pred_masks": outputs["pred_masks"].clone()}
    o2["pred_masks"][:, 3:] += 3.0
    got2 = kmax_losses(o2, targets, matches, num_classes=2, groups=[3, 2], weights=None)
    assert got2["loss_mask"].item() == pytest.approx(got["loss_mask"].item(), rel=1e-5)
    assert got2["loss_pq_dice"].item() == pytest.approx(got["loss_pq_dice"].item(), rel=1e-5)
    # without group ids the target's group is its matched query's group: same result
    t2 = [(m, c) for m, c, _ in targets]
    got3 = kmax_losses(outputs, t2, matches, num_classes=2, groups=[3, 2], weights=None)
    assert got3["loss_mask"].item() == pytest.approx(got["loss_mask"].item(), rel=1e-6)
    # and the fixed matching gives those very matches
    fm = fixed_match(targets, [torch.tensor([0, 2]), torch.tensor([4, 3])])
    assert [q.tolist() for q, _ in fm] == [[0, 2, 4]] * 2


def test_gradients_amp_and_empty_targets():
    outputs, targets, matches = _case(seed=11)
    targets[1] = (torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    matches[1] = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    leaves = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    losses = kmax_losses(leaves, targets, matches, num_classes=C, insdis_sample_k=8)
    sum(losses.values()).backward()
    for k, v in leaves.items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k
    # bf16 inputs under autocast: float32 results equal to the float32 computation
    half = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kmax_losses(half, targets, matches, num_classes=C, insdis_sample_k=4096)
        aux = loss_aux_semantic(torch.randn(2, C, 4, 4).bfloat16(), torch.zeros(2, 4, 4, dtype=torch.long))
    ref = kmax_losses({k: v.float() for k, v in half.items()}, targets, matches, num_classes=C, insdis_sample_k=4096)
    assert aux.dtype == torch.float32
    for k in ref:
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(ref[k].item(), rel=1e-5)
