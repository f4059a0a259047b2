"""Engine mechanism tests on the tiny ``_toy`` method: resume, DDP equivalence, schedules,
parameter groups, config errors."""

from __future__ import annotations

import json
import os
import sys
import socket

import pytest
import torch

import toy_method  # registers _toy and _toy_staged
from labelwise.engine import api
from labelwise.engine.checkpoint import load_checkpoint
from labelwise.engine.config import OptimConfig
from labelwise.engine.data import ShardedSampler
from labelwise.engine.optim import build_param_groups, lr_factor
from labelwise.errors import LabelwiseError


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    torch.set_num_threads(1)


def _params(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


Crash, crash_at = toy_method.Crash, toy_method.crash_at


def test_resume_after_crash_is_bit_identical(tmp_path):
    common = dict(method="_toy", data="toy:x", overrides=["model.noise=0.1", "train.max_steps=9",
                                                          "train.ckpt_every=2", "optim.warmup_steps=3",
                                                          "n_images=10"], show_progress=False)
    ref = api.train(out=tmp_path / "ref", **common)

    with pytest.raises(Crash):
        api.train(out=tmp_path / "run", hooks=[crash_at(5)], **common)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 4
    # resume without repeating the flags: the saved config is reused
    api.train("_toy", "toy:x", tmp_path / "run", show_progress=False)
    _assert_identical(_params(ref), _params(tmp_path / "run"))
    a, b = load_checkpoint(ref / "checkpoints/last.pt"), load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"])  # 10 imgs / 4 = 2 per epoch
    assert a["epoch"] == 4
    # the log holds each step exactly once with identical losses
    la = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, 10))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # keep_last=2 step files + last.pt
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["last.pt", "step_00000008.pt", "step_00000009.pt"]


def test_checkpoints_load_with_weights_only_and_older_ones_still_load(tmp_path):
    import pickle

    import numpy as np

    from labelwise.engine.checkpoint import capture_rng, restore_rng

    run = api.train("_toy", "toy:x", tmp_path / "run", overrides=["n_images=6"], steps=2, show_progress=False)
    ckpt = torch.load(run / "checkpoints/last.pt", map_location="cpu", weights_only=True)  # no pickled code
    restore_rng(ckpt["rng"][0])  # one state per rank
    np.random.seed(3)
    state = capture_rng()
    want = np.random.random(4)
    restore_rng(state)
    assert np.array_equal(np.random.random(4), want)  # numpy's generator round-trips through the tensor form
    # a checkpoint written before (numpy's state as an array) still loads, and its RNG restores
    ckpt["rng"][0]["numpy"] = np.random.get_state()
    want = np.random.random(4)
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "old.pt", weights_only=True)
    old = load_checkpoint(tmp_path / "old.pt")
    restore_rng(old["rng"][0])
    assert np.array_equal(np.random.random(4), want)
    _assert_identical(old["model"], ckpt["model"])


def test_extend_max_steps_continues_exactly(tmp_path):
    sets = ["model.noise=0.1", "optim.schedule=constant", "n_images=12"]
    ref = api.train("_toy", "toy:x", tmp_path / "ref", overrides=sets, steps=7, show_progress=False)
    run = api.train("_toy", "toy:x", tmp_path / "run", overrides=sets, steps=4, show_progress=False)
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 4
    api.train("_toy", "toy:x", run, overrides=sets, steps=7, show_progress=False)
    _assert_identical(_params(ref), _params(run))
    assert "max_steps: 7" in (run / "config.yaml").read_text()
    # a finished run is left alone
    api.train("_toy", "toy:x", run, show_progress=False)
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 7


def test_resume_with_different_config_is_an_error(tmp_path):
    api.train("_toy", "toy:x", tmp_path / "run", steps=2, show_progress=False)
    with pytest.raises(LabelwiseError, match="optim.lr"):
        api.train("_toy", "toy:x", tmp_path / "run", overrides=["optim.lr=0.5"], show_progress=False)
    with pytest.raises(LabelwiseError, match="trained on"):
        api.train("_toy", "toy:y", tmp_path / "run", show_progress=False)


def test_unknown_set_key_names_closest(tmp_path):
    with pytest.raises(LabelwiseError, match="optim.weight_decay"):
        api.train("_toy", "toy:x", tmp_path / "r", overrides=["optim.weight_decya=0.1"], show_progress=False)
    with pytest.raises(LabelwiseError, match="train.amp"):
        api.train("_toy", "toy:x", tmp_path / "r", overrides=["train.amp=fp8"], show_progress=False)
    assert not (tmp_path / "r").exists()


def test_unknown_method_lists_methods():
    from labelwise.methods import get_method

    with pytest.raises(LabelwiseError, match="available methods:.*cam"):
        get_method("camm")


def test_sampler_shards_are_the_global_batch():
    single = ShardedSampler(11, 4, seed=5)
    ranks = [ShardedSampler(11, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_position(epoch)
        g = list(single)
        parts = [list(r) for r in ranks]
        for t in range(single.batches_per_epoch):
            glob = sorted(g[4 * t: 4 * t + 4])
            dd = sorted(parts[0][2 * t: 2 * t + 2] + parts[1][2 * t: 2 * t + 2])
            assert glob == dd
    assert [x for x, _ in single] != list(range(8))  # shuffled
    # a different epoch reshuffles; mid-epoch start skips whole batches
    single.set_position(0)
    e0 = list(single)
    single.set_position(1)
    assert list(single) != e0
    single.set_position(0, 1)
    assert list(single) == e0[4:]


def test_lr_schedule_and_param_groups():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, warmup_init_lr=0.1, schedule="poly", poly_power=1.0)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(5, cfg, 110) == pytest.approx(0.55)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.0)
    cos = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=0)
    assert lr_factor(50, cos, 100) == pytest.approx(0.5)

    net = toy_method.ToyNet(4)
    net.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 4))
    groups = build_param_groups(toy_method.ToyMethod().param_groups(net, None),
                                OptimConfig(lr=2.0, backbone_lr_mult=0.1, weight_decay=0.05))
    by = {g["name"]: g for g in groups}
    assert by["backbone"]["lr"] == pytest.approx(0.2) and by["backbone"]["weight_decay"] == 0.05
    assert by["backbone_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in by["backbone_no_decay"]["params"])  # biases
    assert any(p is net.pos_embed for p in by["head_no_decay"]["params"])
    assert by["head"]["lr"] == pytest.approx(2.0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    base = ["n_images=16", "optim.warmup_steps=0", "train.max_steps=5", "train.ckpt_every=5"]
    api.train("_toy", "toy:x", tmp_path / "single", overrides=base + ["train.batch_size=4"], show_progress=False)
    # train.batch_size is global: 4 over 2 ranks = 2 each, the single process's 4 images per step
    kwargs = dict(method="_toy", data="toy:x", out=str(tmp_path / "ddp"), overrides=base + ["train.batch_size=4"],
                  show_progress=False)
    mp.spawn(toy_method.ddp_worker, args=(2, _free_port(), kwargs), nprocs=2, join=True)
    a, b = _params(tmp_path / "single"), _params(tmp_path / "ddp")
    init = None
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # and training actually moved the weights (the comparison is not vacuous)
    torch.manual_seed(0)
    init = toy_method.ToyNet(8).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3
    log = [json.loads(x) for x in (tmp_path / "ddp/log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "single/log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert json.loads((tmp_path / "ddp/run.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------- EMA teacher
class _ToyEMAMethod(toy_method.ToyMethod):
    """``_toy`` with an EMA teacher on a fast cosine schedule (0.5 -> 1 over the run), so
    every step's momentum differs and an off-by-one in the step index is visible."""

    name = "_toy_ema"
    uses_ema = True

    def ema_momentum(self, cfg, step, max_steps):
        from labelwise.blocks.ema import momentum_schedule

        return momentum_schedule("cosine", base=0.5, final=1.0, total_steps=max_steps)(step)

    def inference_model(self, model, teacher, state, cfg=None):
        return teacher.module  # infer with the teacher (as SeCo/OAP do)


from labelwise.engine.registry import register_method  # noqa: E402

register_method(_ToyEMAMethod)


def _teacher_params(state):
    return {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}


def test_ema_teacher_follows_hand_rolled_ema_and_resumes_bit_identically(tmp_path):
    from labelwise.blocks.ema import momentum_schedule

    n_steps = 7
    common = dict(method="_toy_ema", data="toy:x", show_progress=False,
                  overrides=["model.noise=0.1", f"train.max_steps={n_steps}", "train.ckpt_every=2",
                             "optim.warmup_steps=2", "n_images=10"])
    trajectory = {}  # step -> student parameters (float64) right after that optimizer step

    def record(trainer, step):
        trajectory[step] = {k: v.detach().double().clone() for k, v in trainer.module.named_parameters()}
        assert int(trainer.teacher.num_updates) == step

    ref = api.train(out=tmp_path / "ref", hooks=[record], **common)
    assert sorted(trajectory) == list(range(1, n_steps + 1))
    state = load_checkpoint(ref / "checkpoints/last.pt")
    assert state["ema"] is not None and int(state["ema"]["num_updates"]) == n_steps
    teacher = _teacher_params(state)
    assert teacher.keys() == state["model"].keys()

    # hand-rolled EMA from the initial student (built under train.seed=0), step index 0-based
    torch.manual_seed(0)
    init = {k: v.detach().double() for k, v in toy_method.ToyNet(8).named_parameters()}
    sched = momentum_schedule("cosine", base=0.5, final=1.0, total_steps=n_steps)

    def hand_ema(index_of):
        t = dict(init)
        for s in range(1, n_steps + 1):
            m = sched(index_of(s))
            t = {k: m * t[k] + (1.0 - m) * trajectory[s][k] for k in t}
        return t

    expected = hand_ema(lambda s: s - 1)  # the s-th update uses the momentum of step index s - 1
    for k in expected:
        torch.testing.assert_close(teacher[k].double(), expected[k], rtol=0, atol=2e-6)
    # the check discriminates: off-by-one schedule, the plain student and the init are all far away
    shifted = hand_ema(lambda s: s)
    assert max((shifted[k] - expected[k]).abs().max().item() for k in expected) > 1e-3
    assert max((teacher[k].double() - trajectory[n_steps][k]).abs().max().item() for k in teacher) > 1e-3
    assert max((teacher[k].double() - init[k]).abs().max().item() for k in teacher) > 1e-3

    # interrupted after step 5 (last checkpoint at 4), resumed: bit-identical teacher and student
    with pytest.raises(Crash):
        api.train(out=tmp_path / "run", hooks=[crash_at(5)], **common)
    mid = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert mid["step"] == 4 and int(mid["ema"]["num_updates"]) == 4
    api.train("_toy_ema", "toy:x", tmp_path / "run", show_progress=False)
    resumed = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    _assert_identical(state["ema"], resumed["ema"])
    _assert_identical(state["model"], resumed["model"])
    # the inference loader rebuilds the teacher from the checkpoint
    model = api.load_run(tmp_path / "run", device="cpu").model
    _assert_identical(model.state_dict(), teacher)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_dataloader_workers_die_with_a_killed_parent(tmp_path):
    """A DataLoader worker (worker_init_fn -> die_with_parent) does not outlive a kill -9 of its
    parent: the kernel ends it."""
    import signal
    import subprocess
    import time

    code = f"""
import sys, time, torch
sys.path[:0] = {sys.path!r}
from torch.utils.data import DataLoader, Dataset
from labelwise.engine.data import worker_init_fn
class Slow(Dataset):
    def __len__(self): return 1000
    def __getitem__(self, i):
        time.sleep(0.05 if i < 2 else 60)  # then busy: PyTorch's own watchdog only looks between items
        return i
loader = DataLoader(Slow(), batch_size=None, num_workers=2, worker_init_fn=worker_init_fn)
it = iter(loader)
next(it)
import os
open({str(tmp_path / 'ready')!r}, 'w').write(' '.join(str(w.pid) for w in it._workers))
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", code])
    ready = tmp_path / "ready"
    for _ in range(200):
        if ready.exists() and ready.read_text().strip():
            break
        time.sleep(0.1)
    pids = [int(p) for p in ready.read_text().split()]
    assert len(pids) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 3
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and
                                         "zombie" not in open(f"/proc/{p}/status").read() for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read()]
    assert not alive, alive


def test_plain_text_log_beside_the_jsonl_and_resumed_like_it(tmp_path):
    """RUN_DIR/log.txt: one readable line per logged step (what a cluster user tails), truncated on
    resume exactly like log.jsonl."""
    from labelwise.engine.logging import RunLogger

    lg = RunLogger(tmp_path, tensorboard=False, max_steps=30)
    for step in (10, 20, 30):
        lg.log({"step": step, "loss": 1.0 / step, "lr": 1e-3})
    lg.log_eval({"miou": 0.5}, 30)
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 4 and "train step 10/30" in lines[0] and "loss 0.1" in lines[0] and "lr 1.00e-03" in lines[0]
    assert "eval step 30/30" in lines[3] and "miou 0.5" in lines[3]
    lg.truncate_after(20)
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 2
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    with pytest.raises(LabelwiseError, match="wandb is not installed"):
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
        RunLogger(tmp_path, tensorboard=False, wandb_project="p")


def test_ddp_starts_without_the_broadcast_buffers_deprecation_warning(tmp_path):
    """DistributedDataParallel gets the option name this torch knows (forward_sync_buffers when it
    exists), so every torchrun start is free of the FutureWarning; a False keeps the old name."""
    import warnings

    import torch.distributed as tdist

    from labelwise.engine.trainer import _ddp_kwargs

    assert _ddp_kwargs({"broadcast_buffers": False}) == {"broadcast_buffers": False}
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), **_ddp_kwargs(
                {"find_unused_parameters": False, "broadcast_buffers": True, "static_graph": False}))
    finally:
        tdist.destroy_process_group()


def test_batch_is_global_and_accumulation_equals_the_large_batch(tmp_path):
    """train.batch_size is the global batch: 4 images in one forward equal 2 x 2 accumulated
    (train.batch_per_gpu=2) -- the same samples, the same gradients, the same weights; a split that
    does not divide is one line; a method with per-step state refuses to accumulate."""
    from labelwise.engine.trainer import split_batch

    sets = ["model.noise=0.0", "train.max_steps=4", "train.batch_size=4", "train.log_every=1"]
    one = api.train("_toy", "toy:x", tmp_path / "one", overrides=sets, show_progress=False)
    acc = api.train("_toy", "toy:x", tmp_path / "acc", overrides=sets + ["train.batch_per_gpu=2"],
                    show_progress=False)
    a = load_checkpoint(one / "checkpoints/last.pt")["model"]
    b = load_checkpoint(acc / "checkpoints/last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    la = [json.loads(x)["loss"] for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (acc / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    assert split_batch(64, None, 4) == (16, 1) and split_batch(64, 8, 4) == (8, 2)
    with pytest.raises(LabelwiseError, match="does not divide over 3 ranks"):
        split_batch(64, None, 3)
    with pytest.raises(LabelwiseError, match="not a multiple of train.batch_per_gpu 6"):
        split_batch(64, 6, 2)
