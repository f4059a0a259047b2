"""The CoBra paper protocol in the shipped presets and ``recipes/cobra.yaml``: the cobra voc / coco
presets train without momentum (the release's PolyOptimizer passes the weight decay where SGD
takes the momentum), the segmenter voc / coco presets post-process their test predictions with a
dense CRF (CoBra Sec. 4) and that path cleans a noisy prediction, and the cobra recipe trains IRN
for CoBra's 4 epochs with ``irn_epochs=4`` while its default (null) leaves every stage's resolved
fields -- the resume check's params -- as they were before the variable existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from labelwise.engine.api import resolve_method_config
from labelwise.engine.registry import get_method


def _cfg(method: str, preset: str, overrides=()):
    return resolve_method_config(get_method(method), preset, overrides=list(overrides))


@pytest.mark.parametrize("preset", ["voc", "coco"])
def test_cobra_presets_train_without_momentum_but_with_weight_decay(preset):
    o = _cfg("cobra", preset).optim
    assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.0, False, 1.0e-4)
    # the same reading as the irn presets (the same PolyOptimizer in both releases)
    assert _cfg("irn", preset).optim.momentum == 0.0


@pytest.mark.parametrize("preset,crf", [("voc", True), ("coco", True), ("cpu", False)])
def test_segmenter_presets_post_process_the_test_predictions_with_a_dense_crf(preset, crf):
    assert _cfg("segmenter", preset).infer.crf is crf


def test_segmenter_predict_with_the_voc_preset_crf_cleans_a_noisy_prediction():
    from labelwise.blocks.crf import crf_available
    from labelwise.engine.method import PredictContext
    from labelwise.methods.segmenter.method import SegmenterMethod

    if not crf_available():
        pytest.skip("pydensecrf2 is not installed")
    cfg = _cfg("segmenter", "voc", ["infer.scales=[1.0]", "infer.flip=false"])
    H, W = 40, 60
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2], image[:, W // 2:] = (200, 40, 40), (40, 40, 200)
    gt = np.zeros((H, W), np.int64)
    gt[:, : W // 2], gt[:, W // 2:] = 1, 2
    noisy = gt.copy()
    flip = np.random.default_rng(0).random((H, W)) < 0.2  # 20% of the pixels predict the other half's class
    noisy[flip] = 3 - gt[flip]
    probs = np.full((3, H, W), 0.1, np.float32)
    np.put_along_axis(probs, noisy[None], 0.8, 0)
    logits = torch.from_numpy(np.log(probs))[None]

    class Fixed(torch.nn.Module):  # the network's logits, whatever the input
        def forward(self, x):
            return logits.expand(x.shape[0], -1, -1, -1)

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    acc = {}
    for crf in (False, True):
        cfg.infer.crf = crf
        ctx = PredictContext(cfg=cfg, info=None, what=("segmentation",), device=torch.device("cpu"))
        label = SegmenterMethod().predict(Fixed(), {"inputs": x, "items": [{"image": image}]}, ctx)[0]["segmentation"]
        assert label.dtype == np.uint8 and label.shape == (H, W)
        acc[crf] = float((label == gt).mean())
    # measured: 0.79 without the CRF (the noise), 1.00 with it (two flat colour halves)
    assert acc[False] < 0.85 and acc[True] > 0.98, acc


# --------------------------------------------------------------------------- recipes/cobra.yaml
def _dry_run(recipe, out: Path, monkeypatch, overrides=()) -> dict:
    """Run ``recipe`` through the real runner (resolution, records, resume check) with stage
    runners that only resolve each train stage's config; returns {train stage: config}."""
    from labelwise.stages import kinds, run_recipe

    configs: dict[str, object] = {}

    def train(f, stage_out, ctx):
        configs[stage_out.name] = resolve_method_config(get_method(f.method), f.preset, f.config, f.set, f.steps,
                                                        f.epochs)
        (stage_out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (stage_out / "checkpoints" / "last.pt").write_bytes(b"fake")  # a train stage resumes only with one
        return {"run": str(stage_out)}

    def infer(f, stage_out, ctx):
        return {"out": str(stage_out), **{w: str(stage_out) for w in (f.what or ["segmentation"])}}

    def evaluate(f, stage_out, ctx):
        path = stage_out / "metrics.json"
        path.write_text(json.dumps({"task": f.task, "split": f.split}))
        return {"metrics": str(path)}

    for kind, fake in (("train", train), ("infer", infer), ("evaluate", evaluate)):
        cls, _, required = kinds.KINDS[kind]
        monkeypatch.setitem(kinds.KINDS, kind, (cls, fake, required))
    res = run_recipe(recipe, out, overrides=overrides, data="cooc:/nowhere", show_progress=False,
                     log=lambda m: None)
    configs["_status"] = {r["name"]: r["status"] for r in res["results"]}
    return configs


def test_cobra_recipe_trains_irn_for_cobras_4_epochs_with_irn_epochs_4(tmp_path, monkeypatch):
    from labelwise.stages import load_recipe

    recipe = load_recipe("cobra")
    assert recipe.vars["irn_epochs"] is None
    cfgs = _dry_run(recipe, tmp_path / "voc4", monkeypatch, ["preset=voc", "irn_epochs=4"])
    assert (cfgs["irn"].train.epochs, cfgs["irn"].train.batch_size, cfgs["irn"].data.crop_size) == (4, 32, 512)
    assert cfgs["cobra"].train.epochs == 20 and cfgs["cobra"].optim.momentum == 0.0  # only IRN's length changes
    assert cfgs["segmenter"].infer.crf is True and cfgs["segmenter"].train.max_steps == 30000
    # preset=voc alone keeps the irn preset's 3 epochs (the IRN release)
    assert _dry_run(recipe, tmp_path / "voc", monkeypatch, ["preset=voc"])["irn"].train.epochs == 3


def test_cobra_recipe_default_irn_epochs_leaves_the_cpu_stages_as_they_were(tmp_path, monkeypatch):
    from labelwise.stages import load_recipe

    recipe = load_recipe("cobra")
    before = load_recipe("cobra")
    del before.stage("irn").fields["epochs"]  # the irn stage as it was before irn_epochs existed
    del before.vars["irn_epochs"]
    out = tmp_path / "run"
    old = _dry_run(before, out, monkeypatch)
    assert set(old["_status"].values()) == {"ran"}
    assert (old["irn"].train.epochs, old["irn"].train.max_steps) == (0, _cfg("irn", "cpu").train.max_steps)
    record = json.loads((out / ".stages" / "irn.json").read_text())
    assert record["params"]["epochs"] is None and record["params"]["steps"] is None
    # the recipe with irn_epochs: null resolves every stage to the same params: all skipped
    new = _dry_run(recipe, out, monkeypatch)
    assert set(new["_status"].values()) == {"skipped"}, new["_status"]
    assert json.loads((out / ".stages" / "irn.json").read_text())["params"] == record["params"]
    # and irn_epochs=4 is a change of the irn stage's length (a growable field), not of its other fields
    rec4 = _dry_run(recipe, tmp_path / "cpu4", monkeypatch, ["irn_epochs=4"])
    assert rec4["irn"].train.epochs == 4
    params4 = json.loads((tmp_path / "cpu4" / ".stages" / "irn.json").read_text())["params"]
    changed = {k for k in params4 if params4[k] != record["params"].get(k)}
    assert changed - {"seeds"} == {"epochs"}  # seeds: a path below the other --out
