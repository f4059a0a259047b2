"""CoCal blocks: per-class memory bank, dictionary contrast (Eqs. 5-7), logical path inference."""

import math

import pytest
import torch
import torch.nn.functional as F

from labelwise.blocks.class_bank import ClassMemoryBank
from labelwise.blocks.dictionary_contrastive import dictionary_contrastive_loss, logic_loss
from labelwise.methods.cocal.logic import consistency, path_inference


# ----------------------------------------------------------------------------- references
def _ref_loss(anchors, classes, bank, valid, tau, k, reduction="sum", similarity="dot"):
    """Loop form of Eq. 5: per anchor, mean over its positives of -log softmax over
    positives + the k most similar valid other-class entries (all when k is None); summed over
    anchors (the paper's sum over x in M) or averaged. ``classes[i]`` may be a set of classes."""
    P, S, _ = bank.shape
    a, b = anchors.double(), bank.double()
    if similarity == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    per = []
    for i in range(a.shape[0]):
        xs = classes[i] if isinstance(classes[i], set) else {int(classes[i])}
        pos = [(c, s) for c in range(P) for s in range(S) if c in xs and valid[c, s]]
        if not pos:
            continue
        negs = [(c, s) for c in range(P) for s in range(S) if c not in xs and valid[c, s]]
        sim = {e: float(a[i] @ b[e[0], e[1]]) / tau for e in pos + negs}
        negs = sorted(negs, key=lambda e: -sim[e])
        if k is not None:
            negs = negs[:k]
        den = sum(math.exp(sim[e]) for e in pos + negs)
        per.append(sum(-math.log(math.exp(sim[j]) / den) for j in pos) / len(pos))
    if not per:
        return 0.0
    return sum(per) / len(per) if reduction == "mean" else sum(per)


def _case(seed=0, P=4, S=5, D=8, M=6):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(P, S, D, generator=g)
    valid = torch.rand(P, S, generator=g) > 0.3
    valid[:, 0] = True
    valid[3] = False  # a class with an empty ring: its anchors are skipped
    anchors = torch.randn(M, D, generator=g)
    classes = torch.tensor([0, 1, 2, 3, 1, 0])[:M]
    return anchors, classes, bank, valid


# ----------------------------------------------------------------------------- Eqs. 5-7
@pytest.mark.parametrize("k", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_eq5_matches_loop_reference(k, reduction, similarity):
    anchors, classes, bank, valid = _case()
    got = dictionary_contrastive_loss(anchors, classes, bank, valid, 0.2, k, reduction=reduction,
                                      similarity=similarity)
    ref = _ref_loss(anchors, classes, bank, valid, 0.2, k, reduction, similarity)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_defaults_are_the_papers_sum_of_dot_products():
    """Eq. 5 as written: C(y)_i . B_j (no normalisation) and a sum over the present classes."""
    anchors, classes, bank, valid = _case()
    got = dictionary_contrastive_loss(anchors, classes, bank, valid, 0.2, None)
    assert got.item() == pytest.approx(_ref_loss(anchors, classes, bank, valid, 0.2, None, "sum", "dot"), rel=1e-5)
    from labelwise.methods.cocal.config import CoCalSection

    c = CoCalSection()
    assert (c.similarity, c.reduction, c.logic_hard_negatives) == ("dot", "sum", False)


@pytest.mark.parametrize("k", [None, 2])
def test_reverse_logic_pulls_objects_towards_all_their_parts(k):
    """Fig. 1's "vice versa": object components against the part bank, positives = the stored
    components of every part of that object."""
    from labelwise.blocks.dictionary_contrastive import reverse_logic_loss

    g = torch.Generator().manual_seed(2)
    part_bank, part_valid = torch.randn(5, 4, 8, generator=g), torch.ones(5, 4, dtype=torch.bool)
    part_to_object = torch.tensor([0, 1, 1, 2, 2])
    objs = torch.randn(3, 8, generator=g)
    got = reverse_logic_loss(objs, torch.tensor([0, 1, 2]), part_to_object, part_bank, part_valid, 0.1, k)
    ref = _ref_loss(objs, [{0}, {1, 2}, {3, 4}], part_bank, part_valid, 0.1, k)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    # moving object 1 towards the mean direction of its parts' entries lowers its term (cosine: a
    # direction, not a norm)
    cls = torch.tensor([0, 1, 2])
    unit = F.normalize(part_bank, dim=-1)
    moved = objs.clone()
    moved[1] = F.normalize(objs[1], dim=0) + 3 * unit[1:3].mean((0, 1))
    before = reverse_logic_loss(objs, cls, part_to_object, part_bank, part_valid, 0.5, k, reduction="none",
                                similarity="cosine")
    after = reverse_logic_loss(moved, cls, part_to_object, part_bank, part_valid, 0.5, k, reduction="none",
                               similarity="cosine")
    assert after[1] < before[1] and torch.equal(after[[0, 2]], before[[0, 2]])


@pytest.mark.parametrize("k", [None, 2])
def test_eq7_logic_is_eq5_through_part_to_object(k):
    g = torch.Generator().manual_seed(1)
    obj_bank, obj_valid = torch.randn(3, 4, 8, generator=g), torch.ones(3, 4, dtype=torch.bool)
    obj_valid[2, 2:] = False
    part_to_object = torch.tensor([0, 1, 1, 2, 2])
    parts = torch.randn(5, 8, generator=g)
    part_cls = torch.tensor([0, 1, 2, 3, 4])
    got = logic_loss(parts, part_cls, part_to_object, obj_bank, obj_valid, 0.1, k)
    ref = _ref_loss(parts, part_to_object[part_cls], obj_bank, obj_valid, 0.1, k)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_per_anchor_none_reduction_and_skipped_anchors():
    anchors, classes, bank, valid = _case()
    per = dictionary_contrastive_loss(anchors, classes, bank, valid, 0.2, 3, reduction="none")
    assert per.shape == (6,) and per[3] == 0  # class 3 has no valid positive
    classes = classes.clone()
    classes[0] = -1  # ignored anchor
    per2 = dictionary_contrastive_loss(anchors, classes, bank, valid, 0.2, 3, reduction="none")
    assert per2[0] == 0 and torch.allclose(per2[1:], per[1:])


def test_empty_bank_gives_zero_on_graph():
    anchors = torch.randn(3, 4, requires_grad=True)
    loss = dictionary_contrastive_loss(anchors, torch.tensor([0, 1, 2]), torch.zeros(3, 5, 4),
                                       torch.zeros(3, 5, dtype=torch.bool), 0.1, 100)
    assert loss.item() == 0.0
    loss.backward()
    assert anchors.grad is not None and torch.all(anchors.grad == 0)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_loss_falls_when_anchor_moves_towards_its_class(similarity):
    anchors, classes, bank, valid = _case(seed=2)
    if similarity == "cosine":  # the direction towards the class's mean unit entry
        b = F.normalize(bank, dim=-1)
        centre = (b * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)  # (P, D)
        before = dictionary_contrastive_loss(anchors, classes, bank, valid, 0.1, 3, similarity="cosine")
        a = F.normalize(anchors, dim=-1)
        moved = a + 0.5 * (centre[classes] - a)
        assert dictionary_contrastive_loss(moved, classes, bank, valid, 0.1, 3, similarity="cosine") < before
    # a gradient step on the anchors lowers it; the bank gets no gradient
    x = anchors.clone().requires_grad_(True)
    bk = bank.clone().requires_grad_(True)
    loss = dictionary_contrastive_loss(x, classes, bk, valid, 0.1, 3, similarity=similarity)
    loss.backward()
    assert bk.grad is None
    step = 0.5 if similarity == "cosine" else 1e-3  # raw dot products at tau 0.1: steep
    stepped = dictionary_contrastive_loss(x.detach() - step * x.grad, classes, bank, valid, 0.1, 3,
                                          similarity=similarity)
    assert stepped < loss


def test_hard_negatives_are_the_k_most_similar():
    # anchor along e0; class-0 positives near e0; negatives at known, distinct angles
    S = 4
    angles = torch.tensor([[0.05, -0.05, 0.1, -0.1],  # class 0 (positives)
                           [0.3, 2.5, 3.0, 1.9],      # class 1
                           [0.6, 1.2, 2.8, 0.9]])     # class 2
    bank = torch.stack([angles.cos(), angles.sin()], dim=-1)
    valid = torch.ones(3, S, dtype=torch.bool)
    anchor = torch.tensor([[1.0, 0.0]])
    cls = torch.tensor([0])
    # most similar negatives = smallest angles: 0.3 (1,0), 0.6 (2,0), 0.9 (2,3), 1.2 (2,1)
    expected = [(1, 0), (2, 0), (2, 3), (2, 1)]
    for k in range(1, 5):
        only = torch.zeros_like(valid)
        only[0] = True
        for c, s in expected[:k]:
            only[c, s] = True
        hard = dictionary_contrastive_loss(anchor, cls, bank, valid, 0.1, k)
        literal = dictionary_contrastive_loss(anchor, cls, bank, only, 0.1, None)
        assert hard.item() == pytest.approx(literal.item(), rel=1e-6), k
        wrong = only.clone()
        wrong[expected[k - 1]] = False
        wrong[1, 2] = True  # swap the k-th hardest for the easiest one
        assert dictionary_contrastive_loss(anchor, cls, bank, wrong, 0.1, None).item() < hard.item() - 1e-4
    # invalid entries are never chosen, whatever their similarity
    valid2 = valid.clone()
    valid2[1, 0] = False
    only = torch.zeros_like(valid)
    only[0] = True
    only[2, 0] = True
    assert dictionary_contrastive_loss(anchor, cls, bank, valid2, 0.1, 1).item() == pytest.approx(
        dictionary_contrastive_loss(anchor, cls, bank, only, 0.1, None).item(), rel=1e-6)


# ----------------------------------------------------------------------------- ClassMemoryBank
def _tag(vals, dim=3):
    """Features whose first coordinate identifies them (normalize=False keeps it)."""
    v = torch.as_tensor(vals, dtype=torch.float32)
    return torch.stack([v] + [torch.zeros_like(v)] * (dim - 1), dim=1)


def test_bank_per_class_rings_newest_s_and_fill_counts():
    bank = ClassMemoryBank(3, 4, 3, normalize=False)
    bank.enqueue(_tag([1, 2, 101]), torch.tensor([0, 0, 1]))
    assert bank.count.tolist() == [2, 1, 0] and bank.ptr.tolist() == [2, 1, 0]
    _, valid = bank.get()
    assert valid.tolist() == [[True, True, False, False], [True, False, False, False], [False] * 4]
    snapshot = bank.feats[1:].clone()
    # 7 more of class 0 in one call, interleaved with ignored labels: class 0 keeps its newest 4
    bank.enqueue(_tag([3, 4, -7, 5, 6, 7, 8, 9, -8]), torch.tensor([0, 0, 255, 0, 0, 0, 0, 0, -1]))
    assert torch.equal(bank.feats[1:], snapshot)  # other classes untouched
    assert bank.count.tolist() == [4, 1, 0]
    assert bank.ptr.tolist() == [(2 + 7) % 4, 1, 0]
    assert bank.feats[0, :, 0].tolist() == [9, 6, 7, 8]  # ring positions (value v at slot (v - 1) % 4)
    ordered, valid = bank.get(ordered=True)
    assert ordered[0, :, 0].tolist() == [6, 7, 8, 9] and valid[0].all()
    assert ordered[1, 0, 0] == 101 and valid[1].tolist() == [True, False, False, False]
    # a mixed batch: every class advances independently
    bank.enqueue(_tag([10, 102, 11, 201]), torch.tensor([0, 1, 0, 2]))
    ordered, valid = bank.get(ordered=True)
    assert ordered[0, :, 0].tolist() == [8, 9, 10, 11]
    assert ordered[1, :2, 0].tolist() == [101, 102] and ordered[2, 0, 0] == 201
    assert bank.count.tolist() == [4, 2, 1]


def test_bank_vectorised_matches_sequential_writes():
    g = torch.Generator().manual_seed(3)
    P, S = 5, 6
    bank = ClassMemoryBank(P, S, 3, normalize=False)
    ref = {c: [] for c in range(P)}
    n = 0
    for m in [3, 17, 0, 40, 9]:
        labels = torch.randint(-1, P, (m,), generator=g)
        vals = torch.arange(n, n + m, dtype=torch.float32)
        n += m
        bank.enqueue(_tag(vals), labels)
        for v, c in zip(vals.tolist(), labels.tolist()):
            if c >= 0:
                ref[c] = (ref[c] + [v])[-S:]
        ordered, valid = bank.get(ordered=True)
        for c in range(P):
            assert int(valid[c].sum()) == len(ref[c]) == int(bank.count[c])
            assert ordered[c, :len(ref[c]), 0].tolist() == ref[c]


def test_bank_stores_detached_normalised():
    bank = ClassMemoryBank(2, 3, 4)
    x = torch.randn(5, 4, requires_grad=True) * 3
    bank.enqueue(x, torch.tensor([0, 1, 0, 1, 1]))
    feats, valid = bank.get()
    assert not feats.requires_grad
    assert torch.allclose(feats[valid].norm(dim=-1), torch.ones(5))


def test_bank_state_dict_round_trip():
    bank = ClassMemoryBank(3, 4, 5)
    bank.enqueue(torch.randn(11, 5), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 1]))
    assert set(bank.state_dict()) == {"feats", "ptr", "count"}
    other = ClassMemoryBank(3, 4, 5)
    other.load_state_dict(bank.state_dict())
    for a, b in zip(bank.get(ordered=True), other.get(ordered=True)):
        assert torch.equal(a, b)
    assert torch.equal(other.ptr, bank.ptr)
    # both continue identically after the restore
    x, y = torch.randn(6, 5), torch.tensor([2, 2, 2, 2, 1, 0])
    bank.enqueue(x, y)
    other.enqueue(x, y)
    assert torch.equal(bank.feats, other.feats) and torch.equal(bank.count, other.count)


def test_bank_feeds_the_loss():
    bank = ClassMemoryBank(3, 4, 6)
    bank.enqueue(torch.randn(12, 6), torch.arange(3).repeat(4))
    feats, valid = bank.get()
    loss = dictionary_contrastive_loss(torch.randn(3, 6), torch.arange(3), feats, valid, 0.1, 100)
    assert torch.isfinite(loss) and loss > 0


# ----------------------------------------------------------------------------- path inference
def test_path_inference_always_consistent():
    g = torch.Generator().manual_seed(4)
    P, O = 9, 4
    p2o = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 1])
    part = torch.rand(2, P, 32, 32, generator=g).softmax(1)
    obj = torch.rand(2, O, 32, 32, generator=g).softmax(1)
    part_label, obj_label, path = path_inference(part, obj, p2o)
    assert part_label.shape == obj_label.shape == path.shape == (2, 32, 32)
    assert torch.equal(p2o[part_label], obj_label)
    assert consistency(part_label, obj_label, p2o) == 1.0
    joint = part * obj[:, p2o]
    assert torch.allclose(path, joint.amax(1))
    # independent argmaxes disagree somewhere; the check notices it
    assert consistency(part.argmax(1), obj.argmax(1), p2o) < 1.0


def test_path_inference_snake_reptile():
    # objects: 0 background, 1 snake, 2 reptile; parts: 0 bg, 1 snake-head, 2 snake-body,
    # 3 reptile-head, 4 reptile-body
    p2o = torch.tensor([0, 1, 1, 2, 2])
    part = torch.tensor([0.05, 0.40, 0.10, 0.35, 0.10])  # part argmax: snake-head
    obj = torch.tensor([0.05, 0.25, 0.70])               # object argmax: reptile
    part_label, obj_label, path = path_inference(part.view(1, 5, 1, 1), obj.view(1, 3, 1, 1), p2o)
    assert part.argmax() == 1 and obj.argmax() == 2 and p2o[part.argmax()] != obj.argmax()  # the inconsistent pair
    assert part_label.item() == 3 and obj_label.item() == 2  # reptile-head / reptile
    assert path.item() == pytest.approx(0.35 * 0.70)
    # a confident snake keeps snake-head
    obj2 = torch.tensor([0.05, 0.60, 0.35])
    part_label, obj_label, _ = path_inference(part.view(1, 5, 1, 1), obj2.view(1, 3, 1, 1), p2o)
    assert (part_label.item(), obj_label.item()) == (1, 1)


def test_consistency_ignores_void_and_validates():
    p2o = torch.tensor([0, 1, 1])
    part = torch.tensor([[0, 1, 2, 255]])
    obj = torch.tensor([[0, 1, 0, 3]])
    assert consistency(part, obj, p2o) == pytest.approx(2 / 3)
    assert consistency(torch.full((2, 2), 255), torch.zeros(2, 2, dtype=torch.long), p2o) == 1.0
    with pytest.raises(ValueError):
        path_inference(torch.rand(1, 3, 2, 2), torch.rand(1, 2, 2, 2), torch.tensor([0, 1, 2]))
