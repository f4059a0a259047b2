"""OAP online training (issue 11, WIP): cropped targets, the multi-crop transform and one training step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelwise.config import from_dict, load_yaml


def _cfg(**over):
    from importlib import resources

    from labelwise.methods.oap.config import OAPTrainConfig

    with resources.as_file(resources.files("labelwise") / "configs" / "oap" / "cpu.yaml") as p:
        d = load_yaml(p)
    d["model"].update(pretrained=False)
    d["oap"].update(global_size=96, local_size=48, n_local=2)
    d["loss"].update(num_points=256, match_points=256)
    for k, v in over.items():
        d.setdefault(k, {}).update(v)
    return from_dict(OAPTrainConfig, d)


def _image(seed: int, size: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 40, np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 40, 2)
        img[y0:y0 + 40, x0:x0 + 40] = rng.integers(80, 255, 3)
    return img


def test_crop_targets_undoes_global_flip():
    from labelwise.methods.oap.losses import crop_targets

    h = w = 8
    unflipped = torch.zeros(1, h, w, dtype=torch.bool)
    unflipped[:, :, w // 2:] = True                     # right half of the global view
    seen = unflipped.flip(-1)                            # what a flipped teacher view gives
    t = crop_targets(seen, torch.tensor([1]), torch.zeros(1, 4), torch.tensor([48.0, 0.0, 96.0, 96.0]),
                     96, True, False, (4, 4))
    assert t.masks.shape == (1, 4, 4) and torch.all(t.masks > 0.8)  # bilinear at the edge
    # the left half of the view does not overlap: dropped with its level and logits
    t = crop_targets(seen, torch.tensor([1]), torch.zeros(1, 4), torch.tensor([0.0, 0.0, 40.0, 96.0]),
                     96, True, False, (4, 4))
    assert len(t.masks) == 0 and len(t.level) == 0 and len(t.logits) == 0


def test_train_transform_boxes_inside_global_view():
    from labelwise.methods.oap.method import _TrainTransform

    cfg = _cfg()
    out = _TrainTransform(cfg)({"image": _image(0)}, np.random.default_rng(3))
    assert out["global"].shape == (3, 96, 96) and out["locals"].shape == (2, 3, 48, 48)
    b = out["local_boxes"]
    assert torch.all(b[:, :2] >= 0) and torch.all(b[:, 2:] <= 96 + 1e-4) and torch.all(b[:, 2:] > b[:, :2])
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / 96 ** 2
    assert torch.all(area > 0.03) and torch.all(area < 0.5)


def test_one_training_step_on_two_images():
    from labelwise.blocks.ema import EMATeacher
    from labelwise.engine.method import StepContext
    from labelwise.methods.oap.method import OAPMethod, _TrainTransform

    torch.manual_seed(0)
    cfg = _cfg()
    method = OAPMethod()
    model = method.build_model(cfg, None, pretrained=False)
    state = method.build_state(cfg, None)
    teacher = EMATeacher(model)
    tf = _TrainTransform(cfg)
    batch = torch.utils.data.default_collate([tf({"image": _image(i)}, np.random.default_rng(i)) for i in range(2)])
    ctx = StepContext(cfg=cfg, info=None, step=0, max_steps=10, epoch=1, steps_per_epoch=1,
                      device=torch.device("cpu"), module=model, teacher=teacher, state=state)
    model.train()
    out = method.training_step(model, batch, ctx)
    loss = out["loss"]
    assert torch.isfinite(loss) and loss.item() > 0
    assert out["pairs"].item() > 0 and math.isfinite(out["distill"].item())
    loss.backward()
    method.after_backward(model, ctx)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for prefix in ("backbone.", "pixel_decoder.", "decoder.", "head.mlp"):
        got = [g for n, g in grads.items() if n.startswith(prefix) and g is not None]
        assert got and any(g.abs().sum() > 0 for g in got), prefix
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # centre update from the matched teacher codes
    c0 = state.center.clone()
    method.after_optimizer_step(model, ctx)
    assert not torch.equal(c0, state.center)


def test_momentum_schedule_is_cosine_to_one():
    from labelwise.methods.oap.method import OAPMethod

    cfg = _cfg(oap={"teacher_momentum": 0.996})
    m = OAPMethod()
    assert m.ema_momentum(cfg, 0, 100) == pytest.approx(0.996)
    assert m.ema_momentum(cfg, 100, 100) == pytest.approx(1.0)
    assert m.ema_momentum(cfg, 50, 100) == pytest.approx(1.0 - 0.004 * 0.5)
    assert m.ema_momentum(cfg, 25, 100) == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)


def test_tiny_run_trains_resumes_bit_identically_and_predicts(tmp_path, monkeypatch):
    import json

    import toy_method
    from labelwise.data.synth import generate, testbed_spec
    from labelwise.engine import api
    from labelwise.engine.checkpoint import load_checkpoint
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    spec = testbed_spec("objects", generate("objects", tmp_path / "tb", n_train=6, n_val=2, size=96, seed=0))
    over = ["train.batch_size=2", "train.log_every=1", "train.ckpt_every=2", "train.eval_at_end=false", "model.pretrained=false",
            "oap.global_size=96", "oap.local_size=48", "loss.num_points=256", "loss.match_points=256"]
    common = dict(method="oap", data=spec, preset="cpu", overrides=over, steps=4, show_progress=False)
    ref = api.train(out=tmp_path / "ref", **common)
    log = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    with pytest.raises(toy_method.Crash):
        api.train(out=tmp_path / "run", hooks=[toy_method.crash_at(2)], **common)
    api.train("oap", spec, tmp_path / "run", show_progress=False)
    a = load_checkpoint(ref / "checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    for part in ("model", "ema", "state"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    out = api.infer(ref, spec, "val", tmp_path / "pred", what="universal", show_progress=False)
    res = json.loads((out / "universal.json").read_text())
    assert res and {r["level"] for r in res} <= {"instance", "semantic"}
    assert all(1 <= r["category_id"] <= 64 and 0 <= r["score"] <= 1 for r in res)
    assert len(list((out / "clusters").glob("*.png"))) == 2


def test_vit_adapter_encoder_trains_one_step_and_keys_equal_the_plain_vit():
    from labelwise.blocks.ema import EMATeacher
    from labelwise.engine.method import StepContext
    from labelwise.methods.oap.method import OAPMethod, _TrainTransform

    torch.manual_seed(0)
    cfg = _cfg(model={"backbone": "vit_tiny_patch16_224", "adapter": True, "adapter_heads": 3,
                      "timm_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "img_size": 96}})
    method = OAPMethod()
    model = method.build_model(cfg, None, pretrained=False)
    x = torch.rand(2, 3, 96, 96)
    # zero-initialised injectors: OAP pools exactly the plain ViT's keys at step 0
    plain = model.backbone.vit(x, return_keys=True).keys
    assert torch.allclose(model.encode(x, keys=True)[1], plain, atol=1e-6)
    teacher = EMATeacher(model)
    tf = _TrainTransform(cfg)
    batch = torch.utils.data.default_collate([tf({"image": _image(i)}, np.random.default_rng(i)) for i in range(2)])
    ctx = StepContext(cfg=cfg, info=None, step=0, max_steps=10, epoch=1, steps_per_epoch=1,
                      device=torch.device("cpu"), module=model, teacher=teacher, state=method.build_state(cfg, None))
    out = method.training_step(model, batch, ctx)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]  # DDP without find_unused_parameters needs every parameter used


def test_student_mask_equal_to_a_cropped_teacher_mask_is_matched_to_it():
    from labelwise.methods.oap.losses import crop_targets, match_views

    h = w = 12
    teacher = torch.zeros(3, h, w, dtype=torch.bool)
    teacher[0, :6, :6] = True      # semantic
    teacher[1, 6:, :] = True       # instance
    teacher[2, :6, 6:] = True      # instance
    level = torch.tensor([0, 1, 1])
    t = crop_targets(teacher, level, torch.randn(3, 8), torch.tensor([0.0, 0.0, 96.0, 96.0]), 96, False, False,
                     (12, 12))
    pred = torch.full((1, 4, 12, 12), -10.0)
    qlevel = torch.tensor([0, 0, 1, 1])
    pred[0, 1][t.masks[0] > 0.5] = 10.0   # semantic query 1 = teacher mask 0
    pred[0, 2][t.masks[2] > 0.5] = 10.0   # instance query 2 = teacher mask 2
    pred[0, 3][t.masks[1] > 0.5] = 10.0   # instance query 3 = teacher mask 1
    (q, ti), = match_views(pred, qlevel, [t], num_points=None)
    assert dict(zip(q.tolist(), ti.tolist())) == {1: 0, 2: 2, 3: 1}
