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


@pytest.mark.parametrize("student_global", [False, True])
def test_one_training_step_on_two_images(student_global):
    from labelwise.blocks.ema import EMATeacher
    from labelwise.engine.method import StepContext
    from labelwise.methods.oap.method import OAPMethod, _TrainTransform

    torch.manual_seed(0)
    cfg = _cfg(oap={"student_global": student_global})
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
    if student_global:  # the global views add their own matched pairs to the local views' (same crops, same step)
        local_only = method.training_step(model, batch, StepContext(**{**ctx.__dict__,
                                                                          "cfg": _cfg(oap={"student_global": False})}))
        assert out["pairs"].item() > local_only["pairs"].item()
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

    cfg = _cfg(oap={"teacher_momentum": 0.996, "momentum_schedule": "cosine"})  # the paper's (the cpu preset: constant)
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
    # infer.model: the final EMA teacher by default (the paper), the student's own weights on request
    teacher = api.load_run(ref, device="cpu")
    student = api.load_run(ref, device="cpu", overrides=["infer.model=student"])
    for k, v in student.model.state_dict().items():
        assert torch.equal(v, a["model"][k]), k
    assert any(not torch.equal(v, a["model"][k]) for k, v in teacher.model.state_dict().items())
    stu = api.infer(ref, spec, "val", tmp_path / "stu", what="universal", overrides=["infer.model=student"],
                    show_progress=False)
    assert json.loads((stu / "universal.json").read_text()) != res
    # the raw OAP pseudo-masks of the initial teacher (the recipe's baseline), clustered by k-means
    raw = api.infer(ref, spec, "val", tmp_path / "raw", what="pseudo", overrides=["infer.teacher=initial"],
                    show_progress=False)
    recs = json.loads((raw / "pseudo.json").read_text())
    assert recs and {r["level"] for r in recs} == {"instance", "semantic"}
    assert all("embedding" not in r and 1 <= r["category_id"] <= 64 for r in recs)
    assert len(list((raw / "pseudo_clusters").glob("*.png"))) == 2
    from labelwise.evaluation import evaluate

    inst = evaluate("instance", raw / "pseudo.json", spec, "val", progress=False)
    every = evaluate("instance", raw / "pseudo.json", spec, "val", level="all", progress=False)
    n_inst = sum(r["level"] == "instance" for r in recs)
    assert inst["num_predictions"] == n_inst < every["num_predictions"] == len(recs)
    assert evaluate("unsupervised", raw / "pseudo_clusters", spec, "val", progress=False)["miou"] >= 0


def test_objectness_loss_is_mask2former_class_loss_with_one_class():
    from labelwise.methods.oap.losses import objectness_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 2)
    matches = [(torch.tensor([0, 3]), torch.tensor([1, 0])), (torch.tensor([4]), torch.tensor([0]))]
    target = torch.ones(2, 5, dtype=torch.long)
    target[0, 0] = target[0, 3] = target[1, 4] = 0
    w = torch.tensor([1.0, 0.1])[target]
    ce = -torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
    assert torch.allclose(objectness_loss(logits, matches, 0.1), (w * ce).sum() / w.sum())
    # matched queries pushed to "object": the loss falls when their object logit rises
    up = logits.clone()
    up[0, 0, 0] += 2.0
    assert objectness_loss(up, matches, 0.1) < objectness_loss(logits, matches, 0.1)


def test_dino_head_last_layer_frozen_in_the_first_epoch_only():
    from labelwise.engine.method import StepContext
    from labelwise.methods.oap.method import OAPMethod

    cfg = _cfg()
    method = OAPMethod()
    model = method.build_model(cfg, None, pretrained=False)
    for epoch, frozen in ((0, True), (1, False)):
        model.zero_grad()
        model.head(torch.randn(3, cfg.model.hidden_dim)).sum().backward()
        ctx = StepContext(cfg=cfg, info=None, step=0, max_steps=10, epoch=epoch, steps_per_epoch=1,
                          device=torch.device("cpu"), module=model, teacher=None, state=None)
        method.after_backward(model, ctx)
        grads = [p.grad for p in model.head.last_layer.parameters() if p.requires_grad]
        assert grads and all((g is None) == frozen for g in grads)
        assert all(p.grad is not None for p in model.head.mlp.parameters())  # the MLP always learns


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


def test_plain_vit_pyramid_encoder_trains_one_step():
    from labelwise.blocks.ema import EMATeacher
    from labelwise.engine.method import StepContext
    from labelwise.methods.oap.method import OAPMethod, _TrainTransform

    torch.manual_seed(0)
    cfg = _cfg(model={"backbone": "vit_tiny_patch16_224", "adapter": False,
                      "timm_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 96}})
    method = OAPMethod()
    model = method.build_model(cfg, None, pretrained=False)
    x = torch.rand(2, 3, 96, 96)
    assert torch.equal(model.encode(x, keys=True)[1], model.backbone(x, return_keys=True).keys)
    tf = _TrainTransform(cfg)
    batch = torch.utils.data.default_collate([tf({"image": _image(i)}, np.random.default_rng(i)) for i in range(2)])
    ctx = StepContext(cfg=cfg, info=None, step=0, max_steps=10, epoch=1, steps_per_epoch=1,
                      device=torch.device("cpu"), module=model, teacher=EMATeacher(model),
                      state=method.build_state(cfg, None))
    out = method.training_step(model, batch, ctx)
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert torch.isfinite(out["loss"]) and not unused, unused[:5]


def test_recipe_compares_raw_pseudo_masks_with_the_trained_model(tmp_path, monkeypatch):
    """recipes/oap.yaml end to end at a tiny size: every row of the comparison table is filled."""
    from labelwise.stages.runner import run_recipe

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    res = run_recipe("oap", tmp_path / "r", show_progress=False, log=lambda m: None,
                     overrides=["train=4", "val=2", "size=96", "steps=2",
                                "oap.set=[model.pretrained=false, oap.global_size=96, oap.local_size=48, "
                                "loss.num_points=256, loss.match_points=256, train.batch_size=2, infer.size=96]",
                                "control.set=[oap.targets=ground_truth, model.pretrained=false, oap.global_size=96, "
                                "oap.local_size=48, loss.num_points=256, loss.match_points=256, train.batch_size=2, "
                                "infer.size=96]"])
    rows = {r["stage"]: r for r in res["table"]}
    assert {"raw_agnostic", "raw_hungarian", "raw_semantic", "raw_panoptic", "trained_agnostic",
            "trained_hungarian", "trained_semantic", "trained_panoptic", "student_agnostic", "student_hungarian",
            "student_semantic", "student_panoptic", "final_agnostic", "final_semantic", "control_agnostic",
            "control_semantic", "control_panoptic", "control_student_agnostic", "control_student_semantic",
            "control_student_panoptic"} == set(rows)
    assert all(0.0 <= rows[k]["ar100"] <= 1.0 for k in ("raw_agnostic", "trained_agnostic", "final_agnostic"))
    assert all(0.0 <= rows[k]["miou"] <= 1.0 for k in ("raw_semantic", "trained_semantic", "final_semantic"))
    assert 0.0 <= rows["trained_panoptic"]["pq"] <= 1.0


def test_ground_truth_targets_control_replaces_oap_masks_in_the_teacher_frame():
    """oap.targets=ground_truth (a diagnostic control): the dataset's masks of the global view, mirrored
    like the view, replace OAP's at the view's resolution; the Eq. 6 teacher codes are still made, from
    the masks pooled to the key grid (the same codes as from key-grid masks)."""
    from labelwise.methods.oap.method import OAPMethod, _ground_truth_maps, _ground_truth_masks
    from labelwise.methods.oap.model import teacher_targets

    img = np.zeros((64, 64, 3), np.uint8)
    left = np.zeros((64, 64), bool)
    left[8:40, 0:24] = True                                     # an object on the left
    sem = np.where(left, 1, 0).astype(np.int64)
    sem[:, 60:] = 255                                           # an ignored strip
    item = {"image": img, "mask": sem, "instances": [{"mask": left}]}
    maps = _ground_truth_maps(item, (0, 0, 64, 64), 32, flip=True)
    assert maps["gt_instances"].shape == (32, 32)
    assert maps["gt_instances"][4:20, 20:].eq(1).all() and maps["gt_instances"][:, :16].eq(0).all()  # mirrored
    masks, level = _ground_truth_masks(maps["gt_instances"], maps["gt_semantic"], ("semantic", "instance"))
    assert level.tolist() == [0, 0, 1]  # background and object regions (255 skipped), then the instance
    cfg = _cfg(oap={"global_size": 32, "targets": "ground_truth"})
    method = OAPMethod()
    teacher = method.build_model(cfg, None, pretrained=False).eval()
    tg = teacher_targets(teacher, torch.rand(1, 3, 32, 32), method.pooling(cfg), given=[(masks, level)])[0]
    h = 32 // cfg.model.key_stride
    pooled = torch.nn.functional.adaptive_avg_pool2d(masks[None].float(), (h, h))[0] > 0.5
    assert torch.equal(tg.masks, masks) and tg.logits.shape == (3, cfg.model.out_dim)
    x = torch.rand(1, 3, 32, 32)
    a = teacher_targets(teacher, x, method.pooling(cfg), given=[(masks, level)])[0]
    b = teacher_targets(teacher, x, method.pooling(cfg), given=[(pooled, level)])[0]
    assert torch.allclose(a.logits, b.logits)
    with pytest.raises(Exception, match="targets=ground_truth needs"):
        _ground_truth_maps({"image": img, "mask": None}, (0, 0, 64, 64), 32, flip=False)


def test_a_run_trained_on_a_folder_infers_on_a_labelled_dataset(tmp_path, monkeypatch):
    """OAP trains without labels (folder: has no class list), so its run infers on any dataset --
    e.g. the COCO val split it is then scored against."""
    import json

    from labelwise.data.synth import generate, testbed_spec
    from labelwise.engine import api

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    root = generate("objects", tmp_path / "tb", n_train=4, n_val=2, size=96, seed=0)
    over = ["train.batch_size=2", "train.eval_at_end=false", "model.pretrained=false", "oap.global_size=96",
            "oap.local_size=48", "loss.num_points=256", "loss.match_points=256", "infer.size=96"]
    run = api.train("oap", f"folder:{root / 'images' / 'train'}", tmp_path / "run", preset="cpu", overrides=over,
                    steps=1, show_progress=False)
    out = api.infer(run, testbed_spec("objects", root), "val", tmp_path / "pred", what="universal",
                    show_progress=False)
    assert json.loads((out / "universal.json").read_text())
