"""The method contract: a state module, loss staging, step hooks, an EMA teacher in eval
mode, epochs, parameter groups by module path, fresh method instances, DDP equivalence
and bit-identical resume of a method that uses all of them (``_toy_staged``)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

import toy_method
from labelwise.engine import api
from labelwise.engine.checkpoint import load_checkpoint
from labelwise.engine.config import OptimConfig
from labelwise.engine.optim import build_param_groups, default_param_groups
from labelwise.errors import LabelwiseError


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    torch.set_num_threads(1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _rows_sorted(x: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (a memory bank's storage order depends on the rank interleave)."""
    keys = x.round(decimals=4)
    order = sorted(range(len(x)), key=lambda i: keys[i].tolist())
    return x[order]


STAGED = ["n_images=16", "optim.warmup_steps=0", "train.max_steps=8", "train.ckpt_every=2", "loss.stage_step=2",
          "loss.freeze_proj_epochs=1", "loss.queue_size=64"]


def test_staged_method_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    api.train("_toy_staged", "toy:x", tmp_path / "single", overrides=STAGED + ["train.batch_size=4"],
              show_progress=False)
    # train.batch_size is the global batch: 4 over 2 ranks = 2 each, the single process's 4 per step
    kwargs = dict(method="_toy_staged", data="toy:x", out=str(tmp_path / "ddp"),
                  overrides=STAGED + ["train.batch_size=4"], show_progress=False)
    mp.spawn(toy_method.ddp_worker, args=(2, _free_port(), kwargs), nprocs=2, join=True)
    a = load_checkpoint(tmp_path / "single/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k].float(), b[part][k].float(), rtol=1e-5, atol=1e-6)
    # the state: same centre, same number of banked embeddings (ranks enqueued unequal counts), same set
    sa, sb = a["state"], b["state"]
    torch.testing.assert_close(sa["centre"], sb["centre"], rtol=1e-5, atol=1e-6)
    assert int(sa["queue.count"]) == int(sb["queue.count"]) > 0
    n = int(sa["queue.count"])
    torch.testing.assert_close(_rows_sorted(sa["queue.feats"][:n]), _rows_sorted(sb["queue.feats"][:n]),
                               rtol=1e-4, atol=1e-5)
    la, lb = _log(tmp_path / "single"), _log(tmp_path / "ddp")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    # staging: the contrastive term appears from step stage_step + 1 on (log step = steps done)
    assert [("nce" in r) for r in la] == [("nce" in r) for r in lb] == [False] * 2 + [True] * 6
    assert [r["nce"] for r in la if "nce" in r] == pytest.approx([r["nce"] for r in lb if "nce" in r], rel=1e-5)
    # the projection only moved after the freeze epoch (16 images / 4 = 4 steps per epoch)
    torch.manual_seed(0)
    init = toy_method.ToyNet(8).state_dict()
    assert not torch.equal(a["model"]["proj.weight"], init["proj.weight"])


def test_staged_method_resumes_bit_identically(tmp_path):
    # log_every=3 with checkpoints every 2 steps: the crash lands inside a log window
    common = dict(method="_toy_staged", data="toy:x", overrides=STAGED + ["train.batch_size=4", "model.noise=0.1",
                                                                          "model.dropout=0.3", "train.log_every=3"],
                  show_progress=False)
    ref = api.train(out=tmp_path / "ref", **common)

    with pytest.raises(toy_method.Crash):
        api.train(out=tmp_path / "run", hooks=[toy_method.crash_at(5)], **common)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 4
    api.train("_toy_staged", "toy:x", tmp_path / "run", show_progress=False)
    a = load_checkpoint(ref / "checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    for part in ("model", "ema", "state"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    la, lb = _log(ref), _log(tmp_path / "run")
    assert [r["step"] for r in la] == [3, 6, 8]
    for key in ("loss", "nce", "l1"):  # the window spanning the crash is restored from the checkpoint
        assert [r.get(key) for r in la] == [r.get(key) for r in lb], key
    # the state was really used and checkpointed: the bank is not empty
    assert int(a["state"]["queue.count"]) > 0


def test_teacher_in_eval_mode_and_hooks_see_the_context(tmp_path):
    seen = []

    def check(trainer, step):
        assert trainer.module.training  # the student trains with dropout
        assert not trainer.teacher.module.training and not trainer.teacher.module.drop.training
        x = torch.rand(2, 3, 16, 16)
        assert torch.equal(trainer.teacher(x)[0], trainer.teacher(x)[0])  # no dropout draws in the targets
        ctx = trainer.context()
        assert ctx.optimizer is trainer.optimizer and ctx.state is trainer.state
        assert ctx.steps_per_epoch == 3 and ctx.epoch == (step - 1) // 3 and ctx.max_steps == 6
        seen.append(step)

    api.train("_toy_staged", "toy:x", tmp_path / "r", hooks=[check], epochs=2, show_progress=False,
              overrides=["n_images=12", "model.dropout=0.5", "train.batch_size=4"])
    assert seen == [1, 2, 3, 4, 5, 6]  # train.epochs=2 x 3 steps per epoch
    assert load_checkpoint(tmp_path / "r/checkpoints/last.pt")["max_steps"] == 6
    cfg = (tmp_path / "r/config.yaml").read_text()
    assert "epochs: 2" in cfg
    # --steps switches epochs off and extends the run
    api.train("_toy_staged", "toy:x", tmp_path / "r", steps=7, show_progress=False)
    assert load_checkpoint(tmp_path / "r/checkpoints/last.pt")["step"] == 7
    with pytest.raises(LabelwiseError, match="either --steps or --epochs"):
        api.train("_toy_staged", "toy:x", tmp_path / "r", steps=8, epochs=3, show_progress=False)


def test_after_backward_cancels_gradients_during_the_freeze(tmp_path):
    api.train("_toy_staged", "toy:x", tmp_path / "frozen", show_progress=False,
              overrides=STAGED + ["train.batch_size=4", "train.max_steps=4", "loss.freeze_proj_epochs=1"])
    api.train("_toy_staged", "toy:x", tmp_path / "free", show_progress=False,
              overrides=STAGED + ["train.batch_size=4", "train.max_steps=4", "loss.freeze_proj_epochs=0"])
    torch.manual_seed(0)
    init = toy_method.ToyNet(8).state_dict()
    frozen = load_checkpoint(tmp_path / "frozen/checkpoints/last.pt")["model"]
    free = load_checkpoint(tmp_path / "free/checkpoints/last.pt")["model"]
    assert torch.equal(frozen["proj.weight"], init["proj.weight"])  # 4 steps = epoch 0: cancelled
    assert not torch.equal(free["proj.weight"], init["proj.weight"])
    assert not torch.equal(frozen["head.weight"], init["head.weight"])


def test_param_groups_match_module_path_components():
    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(3, 3)
            self.backbone_proj = torch.nn.Linear(3, 3)  # not a backbone

    class TwoBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn, self.vit = Branch(), Branch()
            self.head = torch.nn.Linear(3, 2)

    net = TwoBranch()
    groups = default_param_groups(net)
    names = {g["name"]: [n for n, _ in g["params"]] for g in groups}
    assert names["backbone"] == ["cnn.backbone.weight", "cnn.backbone.bias", "vit.backbone.weight",
                                 "vit.backbone.bias"]
    assert "cnn.backbone_proj.weight" in names["head"] and "head.weight" in names["head"]
    built = {g["name"]: g for g in build_param_groups(groups, OptimConfig(lr=1.0, backbone_lr_mult=0.1))}
    assert built["backbone"]["lr"] == pytest.approx(0.1) and built["head"]["lr"] == pytest.approx(1.0)


def test_get_method_returns_a_fresh_instance_and_names_unshipped_methods(monkeypatch):
    from labelwise.engine import registry
    from labelwise.engine.registry import get_method, list_methods

    a, b = get_method("cam"), get_method("cam")
    assert type(a) is type(b) and a is not b
    assert "cam" in list_methods() and "_toy_staged" in list_methods()
    # a built-in name whose module is not in this build (every listed method ships today)
    monkeypatch.setitem(registry.BUILTIN_METHODS, "unshipped", "labelwise.methods._not_in_this_build")
    with pytest.raises(LabelwiseError) as e:
        get_method("unshipped")
    assert "not part of this version" in str(e.value) and "did you mean" not in str(e.value)
    with pytest.raises(LabelwiseError, match="did you mean 'cam'"):
        get_method("camm")


def test_state_is_not_in_the_model_or_the_teacher(tmp_path):
    api.train("_toy_staged", "toy:x", tmp_path / "r", show_progress=False,
              overrides=STAGED + ["train.batch_size=4", "train.max_steps=3"])
    ck = load_checkpoint(tmp_path / "r/checkpoints/last.pt")
    assert set(ck["state"]) >= {"centre", "queue.feats", "queue.ptr", "queue.count"}
    assert not any("queue" in k or "centre" in k for k in list(ck["model"]) + list(ck["ema"]))
    loaded = api.load_run(tmp_path / "r", device="cpu")
    assert torch.equal(loaded.state.centre, ck["state"]["centre"])
    assert not any("centre" in k for k in loaded.model.state_dict())


def test_a_checkpoint_that_does_not_fit_is_a_one_line_error(tmp_path):
    api.train("_toy", "toy:x", tmp_path / "r", steps=2, show_progress=False)
    ck = tmp_path / "r/checkpoints/last.pt"
    state = torch.load(ck, weights_only=False)
    state["model"]["head.weight"] = torch.zeros(3, 8, 1, 1)
    state["model"]["conv_head.weight"] = torch.zeros(1)
    del state["model"]["proj.bias"]
    torch.save(state, ck)
    for call in (lambda: api.load_run(tmp_path / "r", device="cpu"),
                 lambda: api.train("_toy", "toy:x", tmp_path / "r", steps=3, show_progress=False)):
        with pytest.raises(LabelwiseError) as e:
            call()
        msg = str(e.value)
        assert "last.pt: its model does not fit" in msg and "\n" not in msg
        assert "1 missing (e.g. proj.bias)" in msg and "1 unexpected (e.g. conv_head.weight)" in msg
        assert "1 wrong shape (e.g. head.weight)" in msg


def test_a_staged_term_is_averaged_over_the_steps_that_returned_it(tmp_path):
    every = api.train("_toy_staged", "toy:x", tmp_path / "every", show_progress=False,
                      overrides=STAGED + ["train.batch_size=4", "train.max_steps=4", "loss.stage_step=3",
                                          "train.log_every=1"])
    window = api.train("_toy_staged", "toy:x", tmp_path / "window", show_progress=False,
                       overrides=STAGED + ["train.batch_size=4", "train.max_steps=4", "loss.stage_step=3",
                                           "train.log_every=4"])
    e, w = _log(every), _log(window)
    assert [r["step"] for r in w] == [4] and "nce" in w[0]
    assert w[0]["nce"] == pytest.approx(e[3]["nce"], rel=1e-6)  # returned at step 4 only: not divided by 4
    assert w[0]["l1"] == pytest.approx(sum(r["l1"] for r in e) / 4, rel=1e-6)


def test_resume_accepts_the_original_flags_plus_runtime_settings(tmp_path):
    sets = ["model.noise=0.1", "n_images=12", "train.ckpt_every=2"]
    api.train("_toy", "toy:x", tmp_path / "r", overrides=sets, steps=2, show_progress=False)
    # the same --set again, plus settings that do not change what is computed (as --device / --skip-bad do)
    api.train("_toy", "toy:x", tmp_path / "r", overrides=sets + ["train.device=cpu", "data.skip_bad=true"], steps=3,
              show_progress=False)
    api.train("_toy", "toy:x", tmp_path / "r", overrides=["train.num_workers=1"], steps=4, show_progress=False)
    assert load_checkpoint(tmp_path / "r/checkpoints/last.pt")["step"] == 4
    with pytest.raises(LabelwiseError, match="differs from the requested config at model.noise"):
        api.train("_toy", "toy:x", tmp_path / "r", overrides=["model.noise=0.2"], steps=5, show_progress=False)


def test_a_run_that_failed_before_its_first_checkpoint_can_be_fixed_in_place(tmp_path):
    with pytest.raises(LabelwiseError, match="lower train.batch_size"):
        api.train("_toy", "toy:x", tmp_path / "r", overrides=["n_images=4", "train.batch_size=8"], show_progress=False)
    assert (tmp_path / "r/config.yaml").is_file() and not (tmp_path / "r/checkpoints").exists()
    api.train("_toy", "toy:x", tmp_path / "r", overrides=["n_images=4", "train.batch_size=2"], steps=2,
              show_progress=False)
    assert "batch_size: 2" in (tmp_path / "r/config.yaml").read_text()
    assert load_checkpoint(tmp_path / "r/checkpoints/last.pt")["step"] == 2
