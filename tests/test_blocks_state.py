"""Stateful blocks: EMA teacher, FIFO memory bank, prototype bank (incl. a 2-rank gloo run)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from labelwise.blocks import EMATeacher, FIFOQueue, PrototypeBank, momentum_schedule


def _small():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


# --------------------------------------------------------------------------- EMA


def test_ema_update_is_exact_lerp_and_copies_buffers():
    torch.manual_seed(0)
    student = _small()
    teacher = EMATeacher(student, momentum=0.9)
    assert all(not p.requires_grad for p in teacher.parameters())
    t0 = [p.clone() for p in teacher.module.parameters()]
    # change the student: an optimiser step and a BN statistics update
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    student(torch.randn(8, 3)).pow(2).sum().backward()
    opt.step()
    s1 = [p.detach().clone() for p in student.parameters()]
    assert not torch.equal(student[1].running_mean, teacher.module[1].running_mean)
    m = teacher.update(student)
    assert m == 0.9
    for t, a, b in zip(teacher.module.parameters(), t0, s1):
        assert torch.allclose(t, 0.9 * a + 0.1 * b, atol=1e-6)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    assert int(teacher.num_updates) == 1
    # the student is untouched and the teacher output needs no grad
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), s1))
    assert not teacher(torch.randn(2, 3)).requires_grad


def test_ema_converges_to_fixed_student_and_momentum_one_freezes():
    student = _small()
    frozen = EMATeacher(student, momentum=1.0)
    moving = EMATeacher(student, momentum=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in frozen.module.parameters()]
    for _ in range(20):
        frozen.update(student)
        moving.update(student)
    assert all(torch.equal(a, b) for a, b in zip(frozen.module.parameters(), before))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(moving.module.parameters(), student.parameters()))


def test_momentum_schedule_cosine_and_callable_momentum():
    s = momentum_schedule("cosine", 0.996, 1.0, total_steps=100)
    vals = [s(i) for i in range(0, 101, 10)]
    assert abs(vals[0] - 0.996) < 1e-12 and abs(vals[-1] - 1.0) < 1e-12
    assert abs(s(50) - 0.998) < 1e-9
    assert all(b >= a for a, b in zip(vals, vals[1:])) and s(500) == 1.0
    assert momentum_schedule("constant", 0.999)(12345) == 0.999
    with pytest.raises(ValueError):
        momentum_schedule("linear")
    student = _small()
    teacher = EMATeacher(student, momentum=s)
    assert teacher.update(student) == pytest.approx(0.996)
    assert teacher.update(student, step=50) == pytest.approx(0.998)


def test_ema_state_dict_round_trip_and_ema_buffers():
    torch.manual_seed(0)
    a = EMATeacher(_small(), 0.99)
    other = _small()
    a.update(other)
    b = EMATeacher(_small(), 0.99)
    b.load_state_dict(a.state_dict())
    assert int(b.num_updates) == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # ema_buffers=True averages the float buffers instead of copying them
    student = _small()
    t = EMATeacher(student, 0.5, ema_buffers=True)
    with torch.no_grad():
        student[1].running_mean.fill_(2.0)
    t.update(student)
    assert torch.allclose(t.module[1].running_mean, torch.full((4,), 1.0))


# --------------------------------------------------------------------------- FIFO queue


def test_fifo_fills_then_evicts_oldest_with_wraparound():
    q = FIFOQueue(size=5, dim=2)
    f, l_ = q.get()
    assert f.shape == (0, 2) and l_.shape == (0,)
    q.enqueue(torch.tensor([[0.0, 0], [1, 1], [2, 2]]), torch.tensor([0, 1, 2]))
    f, l_ = q.get()
    assert len(q) == 3 and l_.tolist() == [0, 1, 2] and f[:, 0].tolist() == [0, 1, 2]
    q.enqueue(torch.tensor([[3.0, 3], [4, 4], [5, 5]]), torch.tensor([3, 4, 5]))  # wraps: 0 evicted
    f, l_ = q.get()
    assert len(q) == 5 and q.full and sorted(l_.tolist()) == [1, 2, 3, 4, 5]
    assert torch.equal(f[:, 0].long(), l_)  # features stay paired with their labels
    fo, lo = q.get(ordered=True)
    assert lo.tolist() == [1, 2, 3, 4, 5]
    # a batch larger than the bank keeps only its newest entries
    q.enqueue(torch.arange(14.0).repeat(2, 1).t(), torch.arange(7).repeat(2))
    _, lo = q.get(ordered=True)
    assert lo.tolist() == [2, 3, 4, 5, 6]


def test_fifo_multiple_label_fields_checkpoint_and_detach():
    q = FIFOQueue(size=4, dim=3, num_label_fields=2)
    x = torch.randn(3, 3, requires_grad=True)
    q.enqueue(x * 2, torch.tensor([[1, 10], [2, 20], [3, 30]]))
    f, l_ = q.get()
    assert l_.shape == (3, 2) and not f.requires_grad
    sd = q.state_dict()
    r = FIFOQueue(size=4, dim=3, num_label_fields=2)
    r.load_state_dict(sd)
    r.enqueue(torch.zeros(2, 3), torch.tensor([[4, 40], [5, 50]]))  # continues at the saved pointer
    _, lo = r.get(ordered=True)
    assert lo[:, 0].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        r.enqueue(torch.zeros(2, 3), torch.tensor([1, 2]))


# --------------------------------------------------------------------------- prototypes


def test_prototype_bank_init_ema_absent_and_ignore():
    bank = PrototypeBank(num_classes=3, dim=2, momentum=0.9)
    feats = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, -1])
    present = bank.update(feats, labels)
    assert present.tolist() == [True, True, False]
    assert bank.initialized.tolist() == [True, True, False]
    assert torch.allclose(bank.prototypes[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(bank.prototypes[2], torch.zeros(2))  # ignored sample did not touch class 2
    # EMA step for class 0 only; class 1 untouched
    p1 = bank.prototypes[1].clone()
    bank.update(torch.tensor([[0.0, 3.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    expect = F.normalize(0.9 * torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([0.0, 1.0]), dim=0)
    assert torch.allclose(bank.prototypes[0], expect, atol=1e-6)
    assert torch.equal(bank.prototypes[1], p1)
    # similarity: a feature near class 1 is most similar to prototype 1
    assert bank.similarity(torch.tensor([[0.1, 4.0]])).argmax().item() == 1


def test_prototype_bank_soft_weights_and_checkpoint():
    bank = PrototypeBank(2, 2, momentum=0.5)
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # sample 1 counts for both classes
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), w)
    assert torch.allclose(bank.prototypes[1], torch.tensor([0.0, 1.0]))
    assert torch.allclose(bank.prototypes[0], F.normalize(torch.tensor([1.0, 0.5]), dim=0))
    other = PrototypeBank(2, 2, momentum=0.5)
    other.load_state_dict(bank.state_dict())
    assert other.initialized.all() and torch.equal(other.prototypes, bank.prototypes)


# --------------------------------------------------------------------------- two ranks (gloo)


def _worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    q = FIFOQueue(size=6, dim=2)
    q.enqueue(torch.full((2, 2), float(rank)), torch.tensor([rank, rank]))
    bank = PrototypeBank(2, 2, momentum=0.9)
    bank.update(torch.tensor([[1.0, 0.0]]) if rank == 0 else torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    student = nn.parallel.DistributedDataParallel(_small())
    teacher = EMATeacher(student, 0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.module.parameters()]
    teacher.update(student)
    ok_ema = all(torch.allclose(t, 0.5 * b + 0.5 * s) for t, b, s in
                 zip(teacher.module.parameters(), before, student.module.parameters()))
    # unequal counts: rank 0 enqueues 1 entry, rank 1 three (e.g. only confident ones), then rank 0 none
    from labelwise.dist import all_gather_cat, all_gather_padded

    q2 = FIFOQueue(size=8, dim=2)
    n = 1 if rank == 0 else 3
    q2.enqueue(torch.arange(2 * n, dtype=torch.float32).view(n, 2) + 10 * rank, torch.full((n,), rank))
    q2.enqueue(torch.ones(0 if rank == 0 else 2, 2) * -1, torch.full((0 if rank == 0 else 2,), 7))
    padded, valid = all_gather_padded(torch.full((rank + 1, 3), float(rank)))
    x = torch.full((rank + 1, 3), float(rank), requires_grad=True)
    cat = all_gather_cat(x)
    (cat * torch.arange(1.0, 4.0)[:, None]).sum().backward()  # row weights 1, 2, 3 in the gathered order
    torch.save({"labels": q.get()[1], "feats": q.get()[0], "proto": bank.prototypes, "ema": ok_ema,
                "q2": q2.get(ordered=True), "padded": padded, "valid": valid, "cat": cat.detach(), "grad": x.grad},
               f"{out_file}.{rank}")
    from labelwise.dist import shutdown

    shutdown(ok=True)  # the ranks meet before leaving (gloo aborts a peer that is still talking)


def test_two_rank_gather_and_reduce(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children reuse the imported torch (spawn would re-import it, ~10x slower here)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    for r in (r0, r1):
        assert r["labels"].tolist() == [0, 0, 1, 1]  # both ranks' batches, in rank order
        assert r["ema"]
        assert torch.allclose(r["proto"][0], torch.tensor([1.0, 1.0]) / math.sqrt(2))  # mean over ranks
    assert torch.equal(r0["feats"], r1["feats"]) and torch.equal(r0["proto"], r1["proto"])
    # unequal counts per rank: padded to the largest and masked, then concatenated in rank order
    for r in (r0, r1):
        feats, labels = r["q2"]
        assert labels.tolist() == [0, 1, 1, 1, 7, 7]
        assert feats.tolist() == [[0, 1], [10, 11], [12, 13], [14, 15], [-1, -1], [-1, -1]]
        assert r["padded"].shape == (2, 2, 3) and r["valid"].tolist() == [[True, False], [True, True]]
        assert r["padded"][0, 1].abs().sum() == 0  # padding rows are zeros
        assert r["cat"].tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
    # the local rows keep their graph: rank 0's row is gathered row 0, rank 1's rows are rows 1 and 2
    assert r0["grad"].tolist() == [[1.0] * 3] and r1["grad"].tolist() == [[2.0] * 3, [3.0] * 3]


def test_ema_teacher_stays_in_eval_mode():
    student = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    parent = nn.Module()
    parent.teacher = EMATeacher(student, 0.9)
    parent.train()  # a parent switching to train mode must not reach the teacher network
    t = parent.teacher
    assert t.training and not t.module.training and not any(m.training for m in t.module.modules())
    x = torch.randn(8, 4)
    stats = t.module[2].running_mean.clone()
    assert torch.equal(t(x), t(x))  # no dropout draws
    assert torch.equal(t.module[2].running_mean, stats)  # BN statistics are not updated by teacher forwards
