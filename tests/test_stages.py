"""Recipes and ``labelwise run``: references between stages, --set/--data overrides, resume of a
killed run (training and inference interrupted) ending equal to an uninterrupted one, redo of
stale stages, the comparison table, and one-line errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from labelwise.cli import main
from labelwise.errors import LabelwiseError
from toy_method import Crash, crash_at
from labelwise.stages import load_recipe, run_recipe

TINY_CAM = ["model.backbone=vit_tiny_test", "model.pretrained=false", "data.crop_size=32", "train.batch_size=4",
            "train.ckpt_every=2", "train.log_every=1", "train.eval_at_end=false"]


def _recipe(path: Path, **extra) -> Path:
    doc = {
        "description": "tiny cam",
        "vars": {"steps": 6, "crf": False},
        "data": "${testbed.spec}",
        "stages": [
            {"name": "testbed", "synth": {"testbed": "cooc", "train": 8, "val": 4, "size": 32, "seed": 3}},
            {"name": "cam", "train": {"method": "cam", "steps": "${vars.steps}", "set": TINY_CAM}},
            {"name": "pred", "infer": {"run": "${cam.run}", "split": "val", "what": ["seeds", "masks"],
                                       "set": ["infer.scales=[1.0]", "infer.crf=${vars.crf}", "infer.batch_size=1",
                                               "infer.num_workers=0"]}},
            {"name": "seeds", "evaluate": {"task": "semantic", "pred": "${pred.seeds}", "split": "val",
                                           "bg_threshold": 0.5, "label": "CAM seeds"}},
            {"name": "masks", "evaluate": {"task": "semantic", "pred": "${pred.masks}", "split": "val"}},
        ],
    }
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")


def _files(d: Path) -> dict[str, bytes]:
    """The predictions in ``d`` (not the hidden record of which run made them, which names paths)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_killed_recipe_resumes_and_ends_equal_to_an_uninterrupted_run(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "r.yaml")
    ref = run_recipe(recipe, tmp_path / "ref", show_progress=False, log=lambda m: None)
    assert [r["status"] for r in ref["results"]] == ["ran"] * 5

    # 1) killed during training (after step 3; last checkpoint at step 2)
    with pytest.raises(Crash):
        run_recipe(recipe, tmp_path / "run", show_progress=False, train_hooks=[crash_at(3)], log=lambda m: None)
    rec = json.loads((tmp_path / "run/.stages/cam.json").read_text())
    assert rec["complete"] is False
    # 2) resumed, then killed during inference after two images were written
    from labelwise.engine import writers

    real_write, written = writers.LabelPNGWriter.write, []

    def flaky(self, item, payload):
        if len(written) == 2:
            raise Crash()
        written.append(item["image_id"])
        real_write(self, item, payload)

    monkeypatch.setattr(writers.LabelPNGWriter, "write", flaky)
    with pytest.raises(Crash):
        run_recipe(recipe, tmp_path / "run", show_progress=False, log=lambda m: None)
    monkeypatch.undo()
    assert len(list((tmp_path / "run/pred").glob("*.png"))) == 2
    # 3) finished
    lines = []
    res = run_recipe(recipe, tmp_path / "run", show_progress=False, log=lines.append)
    assert [r["status"] for r in res["results"]] == ["skipped", "skipped", "ran", "ran", "ran"]
    # the same weights, the same predictions, the same table as the uninterrupted run
    from labelwise.engine.checkpoint import load_checkpoint

    a = load_checkpoint(tmp_path / "ref/cam/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "run/cam/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _files(tmp_path / "ref/pred") == _files(tmp_path / "run/pred")
    assert json.loads((tmp_path / "ref/table.json").read_text()) == json.loads((tmp_path / "run/table.json").read_text())
    table = (tmp_path / "run/table.md").read_text()
    assert table.splitlines()[0] == "| stage | task | split | miou | confusion_ratio | pixel_acc | precision | recall |"
    assert "| CAM seeds | semantic | val |" in table and "| masks | semantic | val |" in table
    # a fourth run does nothing
    res = run_recipe(recipe, tmp_path / "run", show_progress=False, log=lambda m: None)
    assert {r["status"] for r in res["results"]} == {"skipped"}


def test_overrides_redo_what_changed_and_refuse_retraining(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml")
    run_recipe(recipe, tmp_path / "o", show_progress=False, log=lambda m: None)
    ck = tmp_path / "o/cam/checkpoints/last.pt"
    mtime = ck.stat().st_mtime_ns
    # an infer field changes: inference and what depends on it are redone, training is not
    res = run_recipe(recipe, tmp_path / "o", overrides=["pred.split=train", "seeds.split=train", "masks.split=train"],
                     show_progress=False, log=lambda m: None)
    assert [r["status"] for r in res["results"]] == ["skipped", "skipped", "ran", "ran", "ran"]
    assert ck.stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "o/pred").glob("*.png"))) == 8 and not (tmp_path / "o/pred/val_000000.png").exists()
    # more steps: training continues from its checkpoint, the rest is redone
    res = run_recipe(recipe, tmp_path / "o", overrides=["steps=8", "pred.split=train", "seeds.split=train",
                                                        "masks.split=train"], show_progress=False, log=lambda m: None)
    from labelwise.engine.checkpoint import load_checkpoint

    assert load_checkpoint(ck)["step"] == 8
    assert [r["status"] for r in res["results"]] == ["skipped", "ran", "ran", "ran", "ran"]
    # any other change to a training stage is refused with one line naming the key
    with pytest.raises(LabelwiseError, match=r"stage 'cam' \(train\): its fields set changed"):
        run_recipe(recipe, tmp_path / "o", overrides=["cam.set=[optim.lr=0.5]"], show_progress=False,
                   log=lambda m: None)
    # so is a change to what a finished training stage was trained on -- before anything is touched
    before = _files(tmp_path / "o/testbed")
    with pytest.raises(LabelwiseError,
                       match=r"stage 'testbed' changed \(field seed\) since .*cam was trained on its outputs"):
        run_recipe(recipe, tmp_path / "o", overrides=["testbed.seed=9"], show_progress=False, log=lambda m: None)
    assert _files(tmp_path / "o/testbed") == before and ck.stat().st_mtime_ns != mtime  # (grown above)
    assert load_checkpoint(ck)["step"] == 8


def test_per_class_columns_of_the_comparison_table(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", table={"classes": ["disc", "ring"], "groups": {"pair": ["disc", "ring"]}})
    run_recipe(recipe, tmp_path / "t", show_progress=False, log=lambda m: None)
    rows = json.loads((tmp_path / "t/table.json").read_text())
    md = (tmp_path / "t/table.md").read_text()
    assert "| stage | split | disc IoU (FP/TP) | ring IoU (FP/TP) |" in md
    masks = next(r for r in rows if r["stage"] == "masks")
    iou, cr = masks["per_class_iou"]["disc"], masks["per_class_confusion_ratio"]["disc"]
    assert f"| masks | val | {iou:.3f} (" in md and (cr is None or f"({cr:.3f})" in md or "(inf)" in md)
    # the group table: mean IoU and mean FP/TP over the group's classes with a finite value
    assert "| stage | split | pair mean IoU (FP/TP) |" in md
    ious = [masks["per_class_iou"][c] for c in ("disc", "ring")]
    crs = [v for v in (masks["per_class_confusion_ratio"][c] for c in ("disc", "ring")) if v is not None
           and math.isfinite(v)]
    mean_cr = f"{sum(crs) / len(crs):.3f}" if crs else "-"
    assert f"| masks | val | {sum(ious) / 2:.3f} ({mean_cr}) |" in md
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"table": {"klasses": ["disc"]}, "stages": [{"name": "a", "synth": {}}]}))
    with pytest.raises(LabelwiseError, match="'table' takes"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({"table": {"groups": {"pair": []}}, "stages": [{"name": "a", "synth": {}}]}))
    with pytest.raises(LabelwiseError, match="'table' takes"):
        load_recipe(bad)


def test_data_override_skips_the_unused_testbed(tmp_path):
    from labelwise.data.synth import generate

    mine = generate("cooc", tmp_path / "mine", n_train=8, n_val=4, size=32, seed=5)
    res = run_recipe(_recipe(tmp_path / "r.yaml"), tmp_path / "d", data=f"voc:{mine}", show_progress=False,
                     log=lambda m: None)
    assert "testbed" not in res["stages"] and not (tmp_path / "d/testbed").exists()
    rows = json.loads((tmp_path / "d/table.json").read_text())
    assert [r["stage"] for r in rows] == ["seeds", "masks"]
    from labelwise.evaluation import evaluate

    direct = evaluate("semantic", tmp_path / "d/pred", f"voc:{mine}", "val", progress=False)
    assert rows[1]["miou"] == pytest.approx(direct["miou"])
    assert rows[0]["miou"] == pytest.approx(
        evaluate("semantic", tmp_path / "d/pred", f"voc:{mine}", "val", progress=False, bg_threshold=0.5)["miou"])


def test_pseudo_masks_stage_and_instance_table(tmp_path):
    doc = {
        "data": "${objects.spec}",
        "stages": [
            {"name": "objects", "synth": {"testbed": "objects", "train": 1, "val": 3, "size": 64}},
            {"name": "oap", "pseudo-masks": {"method": "oap", "split": "val",
                                              "set": ["features.backbone=vit_tiny_test", "features.random_init=true",
                                                      "features.resolution=64", "oap.min_area=2",
                                                      "features.num_workers=0"]}},
            {"name": "ap", "evaluate": {"task": "instance", "pred": "${oap.json}", "split": "val"}},
        ],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    torch.manual_seed(0)
    res = run_recipe(tmp_path / "p.yaml", tmp_path / "p", show_progress=False, log=lambda m: None)
    masks = json.loads(Path(res["stages"]["oap"]["json"]).read_text())
    assert masks and {m["file_name"] for m in masks} <= {f"val_{i:06d}.png" for i in range(3)} | \
        {f"val_{i:06d}.jpg" for i in range(3)}
    row = json.loads((tmp_path / "p/table.json").read_text())[0]
    assert row["task"] == "instance" and 0.0 <= row["ap50"] <= 1.0
    assert "| ap | instance | val |" in (tmp_path / "p/table.md").read_text()


def test_recipe_errors_are_one_line(tmp_path, capsys):
    def bad(stages, **kw):
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({"stages": stages, **kw}))
        return p

    with pytest.raises(LabelwiseError, match="later stage; move it below"):
        load_recipe(bad([{"name": "a", "infer": {"run": "${b.run}", "split": "x"}},
                         {"name": "b", "train": {"method": "cam"}}]))
    with pytest.raises(LabelwiseError, match="exactly one kind key"):
        load_recipe(bad([{"name": "a", "trian": {"method": "cam"}}]))
    with pytest.raises(LabelwiseError, match="used twice"):
        load_recipe(bad([{"name": "a", "train": {"method": "cam"}}, {"name": "a", "train": {"method": "cam"}}]))
    with pytest.raises(LabelwiseError, match="unknown config key 'methd'.*did you mean 'method'"):
        run_recipe(bad([{"name": "a", "train": {"methd": "cam"}}], data="voc:/x"), tmp_path / "o",
                   log=lambda m: None)
    recipe = _recipe(tmp_path / "r.yaml")
    with pytest.raises(LabelwiseError, match="no variable 'stepz'; did you mean 'steps'"):
        run_recipe(recipe, tmp_path / "o2", overrides=["stepz=3"], log=lambda m: None)
    with pytest.raises(LabelwiseError, match="no stage 'camm'; did you mean 'cam'"):
        run_recipe(recipe, tmp_path / "o2", overrides=["camm.steps=3"], log=lambda m: None)
    # through the CLI: exit 2, one line
    for args, needle in ((["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o3")], "file not found"),
                         (["run", str(recipe)], "needs a RECIPE and --out"),
                         (["run", str(recipe), "--out", str(tmp_path / "o3"), "--set", "stepz=1"], "did you mean")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_shipped_recipes_load_and_are_listed(capsys):
    from labelwise.stages import shipped_recipes

    assert "demo" in shipped_recipes()
    r = load_recipe("demo")
    assert [s.kind for s in r.stages][:3] == ["synth", "train", "infer"]
    assert main(["run", "--list"]) == 0
    assert "demo" in capsys.readouterr().out
    repo = Path(__file__).resolve().parents[1] / "recipes"
    if repo.exists():  # the repository's recipes/ is the shipped folder
        assert sorted(p.name for p in repo.glob("*.yaml")) == sorted(f"{n}.yaml" for n in shipped_recipes())


def test_substitution_keeps_types_and_formats_strings():
    from labelwise.stages.recipe import substitute

    vals = {("vars", "n"): 3, ("vars", "flag"): True, ("vars", "none"): None, ("a", "run"): "/x/run"}

    def lookup(name, key, where):
        return vals[(name, key)]

    out = substitute({"steps": "${vars.n}", "set": ["infer.crf=${vars.flag}", "k=${vars.none}"],
                      "run": "${a.run}", "path": "${a.run}/checkpoints"}, lookup, "s")
    assert out == {"steps": 3, "set": ["infer.crf=true", "k=null"], "run": "/x/run", "path": "/x/run/checkpoints"}
    assert np.isscalar(out["steps"])


def test_deleted_outputs_are_redone_and_a_failed_training_stage_can_be_fixed(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml")
    # a typo in the training stage fails before any checkpoint; fixing it continues in place
    with pytest.raises(LabelwiseError, match="optim.lrr"):
        run_recipe(recipe, tmp_path / "o", overrides=["cam.set=[optim.lrr=0.1]"], show_progress=False,
                   log=lambda m: None)
    run_recipe(recipe, tmp_path / "o", show_progress=False, log=lambda m: None)
    table = (tmp_path / "o/table.json").read_text()
    # deleted outputs are noticed: the stage (and what depends on it) is redone
    import shutil

    shutil.rmtree(tmp_path / "o/pred")
    lines = []
    res = run_recipe(recipe, tmp_path / "o", show_progress=False, log=lines.append)
    assert [r["status"] for r in res["results"]] == ["skipped", "skipped", "ran", "ran", "ran"]
    assert any("pred (infer): its outputs are missing" in ln for ln in lines)
    assert (tmp_path / "o/table.json").read_text() == table
    (tmp_path / "o/masks/metrics.json").unlink()
    res = run_recipe(recipe, tmp_path / "o", show_progress=False, log=lambda m: None)
    assert [r["status"] for r in res["results"]] == ["skipped"] * 4 + ["ran"]
    # "delete that folder to retrain" works: the deleted training stage starts afresh
    with pytest.raises(LabelwiseError, match="delete that folder"):
        run_recipe(recipe, tmp_path / "o", overrides=["cam.set=[optim.lr=0.5]"], show_progress=False,
                   log=lambda m: None)
    shutil.rmtree(tmp_path / "o/cam")
    res = run_recipe(recipe, tmp_path / "o", overrides=["cam.set=[optim.lr=0.5]"], show_progress=False,
                     log=lambda m: None)
    assert [r["status"] for r in res["results"]] == ["skipped", "ran", "ran", "ran", "ran"]


def test_variable_cycles_and_self_references_are_one_line_errors(tmp_path):
    p = _recipe(tmp_path / "r.yaml", vars={"a": "${vars.b}", "b": "${vars.a}", "steps": "${vars.a}", "crf": False})
    with pytest.raises(LabelwiseError, match=r"cycle: a -> b -> a|cycle: b -> a -> b"):
        run_recipe(p, tmp_path / "o", show_progress=False, log=lambda m: None)
    q = tmp_path / "self.yaml"
    q.write_text(yaml.safe_dump({"stages": [{"name": "a", "infer": {"run": "${a.run}", "split": "x"}}]}))
    with pytest.raises(LabelwiseError, match=r"refers to \$\{a...\}, itself"):
        load_recipe(q)


def test_bench_recipe_tables_average_runs_and_merged_rows(tmp_path):
    """``bench/recipe_tables.py``: a cell is the mean over runs and over the rows ``--merge`` folds
    together (every value listed in run order); a metric no row has is not shown; a folder
    with neither table.json nor a finished stage stops with one line naming it."""
    import runpy

    mod = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "bench", "recipe_tables.py"))
    for name, shift in (("a", 0.0), ("b", 0.2)):
        (tmp_path / name).mkdir()
        rows = [{"label": f"tau 0.1, training seed {s}", "miou": 0.4 + shift + 0.1 * s} for s in (0, 1)]
        rows.append({"label": "control", "miou": 0.5 + shift, "ap50": 0.3})
        (tmp_path / name / "table.json").write_text(json.dumps(rows))
    out = tmp_path / "t"
    assert mod["main"]([f"s0={tmp_path / 'a'}", f"s1={tmp_path / 'b'}", "--metrics", "miou,ap50,pq",
                        "--merge", r", training seed \d+", "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    assert "| row | miou | ap50 |" in text  # pq: in no row
    assert "| tau 0.1 | 0.550 (0.400 / 0.500 / 0.600 / 0.700) | - |" in text
    assert "| control | 0.600 (0.500 / 0.700) | 0.300 (0.300 / 0.300) |" in text
    # a run without a row: "–" in its place, the mean over the runs that have it
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "table.json").write_text(json.dumps([{"label": "control", "miou": 0.9}]))
    assert mod["main"]([f"s0={tmp_path / 'a'}", f"s1={tmp_path / 'd'}", "--metrics", "miou",
                        "--merge", r", training seed \d+", "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    assert "| tau 0.1 | 0.450 (0.400 / 0.500 / –) |" in text
    assert "| control | 0.700 (0.500 / 0.900) |" in text
    with pytest.raises(SystemExit, match="table.json: not found"):
        mod["main"]([str(tmp_path / "empty"), "--metrics", "miou"])
    # a run stopped before its table: the finished evaluate stages, labelled by stage name
    (tmp_path / "c" / "x_s0_eval").mkdir(parents=True)
    (tmp_path / "c" / "x_s0_eval" / "metrics.json").write_text(json.dumps({"miou": 0.25}))
    assert mod["main"]([str(tmp_path / "c"), "--metrics", "miou", "--merge", "_s\\d+", "--out", str(out)]) == 0
    assert "| x_eval | 0.250 |" in out.with_suffix(".md").read_text()
    # --from-stages: a folder whose table.json holds only the last partial recipe's rows; every finished
    # evaluate stage is read, labelled by its record's label
    (tmp_path / "c" / "table.json").write_text(json.dumps([{"label": "only the last", "miou": 0.9}]))
    (tmp_path / "c" / ".stages").mkdir()
    (tmp_path / "c" / ".stages" / "x_s0_eval.json").write_text(json.dumps({"params": {"label": "row x"}}))
    assert mod["main"]([str(tmp_path / "c"), "--metrics", "miou", "--from-stages", "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    assert "| row x | 0.250 |" in text and "only the last" not in text
