"""kmax (kMaX-DeepLab parsing) and cocal: targets, dictionary components, the Table 2 switches,
short runs that train, resume, predict and evaluate on a parts testbed, path-consistent parsing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from labelwise.errors import LabelwiseError

TINY = ["model.pretrained=false", "data.crop_size=64", "train.batch_size=2", "train.log_every=1",
        "train.ckpt_every=2", "train.eval_at_end=false", "loss.instdisc_samples=64"]


@pytest.fixture(scope="module")
def parts_spec(tmp_path_factory):
    from labelwise.data.synth import generate, testbed_spec

    root = tmp_path_factory.mktemp("parts")
    return testbed_spec("parts", generate("parts", root / "tb", n_train=6, n_val=3, size=64, seed=0))


def test_level_targets_one_segment_per_present_class():
    from labelwise.methods.kmax.method import level_targets

    lab = torch.tensor([[0, 0, 3], [3, 255, 5]])
    masks, classes, group = level_targets(lab, 1, offset=10)
    assert classes.tolist() == [10, 13, 15] and group.tolist() == [1, 1, 1]
    assert masks[1].tolist() == [[False, False, True], [True, False, False]]


def test_present_components_are_the_centres_of_the_classes_in_each_image():
    from labelwise.methods.cocal.method import present_components

    P, O, D = 4, 3, 5
    centres = torch.randn(2, P + O, D)
    batch = {"parts": torch.tensor([[[0, 2], [2, 255]], [[1, 1], [3, 0]]]),
             "objects": torch.tensor([[[0, 1], [1, 255]], [[2, 2], [2, 0]]])}
    pa, pc, oa, oc = present_components({"cluster_centres": centres}, batch, P)
    assert pc.tolist() == [0, 2, 0, 1, 3] and oc.tolist() == [0, 1, 0, 2]
    assert torch.equal(pa[1], centres[0, 2]) and torch.equal(oa[3], centres[1, P + 2])


def test_switches_all_off_are_kmax_and_logic_needs_the_dictionary():
    from labelwise.config import from_dict
    from labelwise.methods.cocal.config import CoCalConfig
    from labelwise.methods.cocal.method import CoCalMethod

    off = {"dictionary": False, "p_con": False, "o_con": False, "logic_loss": False, "path_inference": False}
    m = CoCalMethod()
    cfg = from_dict(CoCalConfig, {"cocal": off})
    assert not m.uses_dictionary(cfg) and m.build_state(cfg, None) is None
    for key in ("logic_loss", "path_inference", "logic_reverse"):
        with pytest.raises(LabelwiseError, match=f"cocal.{key} need cocal.dictionary=true"):
            from_dict(CoCalConfig, {"cocal": {**off, key: True}})
    with pytest.raises(LabelwiseError, match="cocal.logic"):  # the old joint switch names its replacements
        from_dict(CoCalConfig, {"cocal": {"logic": True}})


def test_path_inference_changes_at_inference_and_nothing_else_does(parts_spec, tmp_path, monkeypatch):
    """cocal.path_inference is an inference switch (Method.inference_keys): one trained run gives
    Table 2's rows with and without it; training keys still cannot change at inference."""
    from labelwise.engine import api
    from labelwise.evaluation import evaluate

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    run = api.train("cocal", parts_spec, tmp_path / "run", preset="cpu", steps=2, show_progress=False,
                    overrides=TINY + ["cocal.path_inference=false", "cocal.logic_reverse=true"])
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert {"p_con", "o_con", "logic", "logic_reverse"} <= set(log[-1])
    free = api.infer(run, parts_spec, "val", tmp_path / "free", what="parts", show_progress=False)
    path = api.infer(run, parts_spec, "val", tmp_path / "path", what="parts", show_progress=False,
                     overrides=["cocal.path_inference=true"])
    assert evaluate("parts", path, parts_spec, "val", progress=False)["consistency"] == 1.0
    assert evaluate("parts", free, parts_spec, "val", progress=False)["consistency"] <= 1.0
    with pytest.raises(LabelwiseError, match="only infer.* and cocal.path_inference"):
        api.infer(run, parts_spec, "val", tmp_path / "bad", what="parts", overrides=["cocal.tau=0.5"],
                  show_progress=False)


@pytest.mark.parametrize("name", ["kmax", "cocal"])
def test_short_run_trains_resumes_bit_identically_predicts_and_evaluates(name, parts_spec, tmp_path, monkeypatch):
    import toy_method
    from labelwise.engine import api
    from labelwise.engine.checkpoint import load_checkpoint
    from labelwise.evaluation import evaluate

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    common = dict(method=name, data=parts_spec, preset="cpu", overrides=TINY, steps=4, show_progress=False)
    ref = api.train(out=tmp_path / "ref", **common)
    log = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    if name == "cocal":
        assert all(k in log[-1] for k in ("p_con", "o_con", "logic"))
    with pytest.raises(toy_method.Crash):
        api.train(out=tmp_path / "run", hooks=[toy_method.crash_at(2)], **common)
    api.train(name, parts_spec, tmp_path / "run", show_progress=False)
    a = load_checkpoint(ref / "checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    for part in ("model", "state"):
        for k in a.get(part) or {}:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    if name == "cocal":  # the banks are method state: filled, checkpointed
        assert int(a["state"]["part_bank.count"].sum()) > 0
    out = api.infer(ref, parts_spec, "val", tmp_path / "pred", what="parts", show_progress=False)
    r = evaluate("parts", out, parts_spec, "val", progress=False)
    assert 0.0 <= r["part_miou"] <= 1.0 and 0.0 <= r["object_miou"] <= 1.0
    if name == "cocal":  # path-probability inference: part and object maps agree by construction
        assert r["consistency"] == 1.0


def test_path_parsing_never_outputs_a_part_of_another_object():
    from labelwise.methods.cocal.logic import path_inference

    g = torch.Generator().manual_seed(0)
    p2o = torch.tensor([0, 1, 1, 2, 2, 2])
    pp = torch.rand(2, 6, 16, 16, generator=g).softmax(1)
    po = torch.rand(2, 3, 16, 16, generator=g).softmax(1)
    parts, objects, _ = path_inference(pp, po, p2o)
    assert torch.equal(p2o[parts], objects)


@pytest.mark.slow
def test_ablation_recipe_runs_every_table2_row(tmp_path, monkeypatch):
    """recipes/cocal-ablation.yaml at a tiny size: every Table 2 row trains, parses and is scored."""
    from labelwise.stages.runner import run_recipe

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    tiny = "[" + ", ".join(TINY) + "]"
    over = ["train=4", "val=2", "size=64", "steps=1"] + [f"{s}.set={tiny}" for s in ("kmax",)]
    for s, sw in (("dict", "false, false, false"), ("pcon", "true, false, false"), ("ocon", "true, true, false"),
                  ("logic", "true, true, true")):
        p, o, lg = (x.strip() for x in sw.split(","))
        over.append(f"{s}.set=[{', '.join(TINY)}, cocal.dictionary=true, cocal.p_con={p}, cocal.o_con={o}, "
                    f"cocal.logic_loss={lg}, cocal.path_inference=false]")
    res = run_recipe("cocal-ablation", tmp_path / "r", show_progress=False, log=lambda m: None, overrides=over)
    rows = {r["stage"]: r for r in res["table"]}
    assert set(rows) == {"t2_kmax", "t2_dict", "t2_pcon", "t2_ocon", "t2_logic", "t2_cocal", "t2_ocon_path"}
    assert all(0.0 <= r["part_miou"] <= 1.0 for r in rows.values())
    assert rows["t2_cocal"]["consistency"] == 1.0 and rows["t2_ocon_path"]["consistency"] == 1.0


def test_cocal_trains_and_parses_on_the_partimagenet_release_layout(tmp_path, monkeypatch):
    """The release adapter (41 parts / 12 objects incl. background) feeds cocal like parts: data."""
    from labelwise.data.adapters.partimagenet import PARTIMAGENET_PARTS
    from labelwise.engine import api
    from labelwise.evaluation import evaluate
    from labelwise.io import write_image, write_label

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    root = tmp_path / "PartImageNet_Seg" / "PartImageNet"
    cats = [{"id": k, "name": n, "supercategory": s} for k, (n, s) in enumerate(PARTIMAGENET_PARTS)]
    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / "annotations" / split).mkdir(parents=True)
        (root / "annotations" / split / f"{split}.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": cats}))
        for i in range(n):
            raw = torch.full((64, 64), 40, dtype=torch.uint8)
            k = int(torch.randint(0, 40, (), generator=rng))
            raw[8:40, 8:40] = k
            write_image(root / "images" / split / f"n0000000{i}_{split}.JPEG",
                        (torch.rand(64, 64, 3, generator=rng) * 255).to(torch.uint8).numpy())
            write_label(root / "annotations" / split / f"n0000000{i}_{split}.png", raw.numpy())
    spec = f"partimagenet:{tmp_path / 'PartImageNet_Seg'}"
    run = api.train("cocal", spec, tmp_path / "run", preset="cpu", overrides=TINY, steps=2, show_progress=False)
    out = api.infer(run, spec, "val", tmp_path / "pred", what="parts", show_progress=False)
    r = evaluate("parts", out, spec, "val", progress=False)
    assert r["consistency"] == 1.0 and 0.0 <= r["part_miou"] <= 1.0
