"""bench/cocal_loss_strength.py: the per-term split of CoCal's training step on a tiny trained run."""

from __future__ import annotations

import json
import math
import bench_scripts
import pytest
import torch

TINY = ["model.pretrained=false", "data.crop_size=64", "train.batch_size=2", "train.log_every=1",
        "train.ckpt_every=2", "train.eval_at_end=false", "loss.instdisc_samples=64", "cocal.bank_size=4",
        "cocal.hard_negatives=3", "cocal.logic_reverse=true", "cocal.similarity=cosine", "cocal.reduction=mean"]
ROW = {"value", "grad_queries", "grad_components", "grad_trunk", "trunk_over_kmax", "cos_queries_kmax",
       "cos_components_kmax", "cos_trunk_kmax"}
FLOOR = {"at_floor", "excess", "anchors"}
CONTRASTIVE = {"L_p_con": "p_con", "L_o_con": "o_con", "L_logic": "logic", "L_logic_rev": "logic_reverse"}


def _bench():
    return bench_scripts.load("cocal_loss_strength")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from labelwise.data.synth import generate, testbed_spec
    from labelwise.engine import api

    root = tmp_path_factory.mktemp("cls")
    spec = testbed_spec("parts", generate("parts", root / "tb", n_train=6, n_val=2, size=64, seed=0))
    return api.train("cocal", spec, root / "run", preset="cpu", steps=3, show_progress=False, overrides=TINY)


def test_every_term_its_row_and_the_values_the_step_logs(run_dir, tmp_path):
    from labelwise.engine import api
    from labelwise.engine.method import StepContext

    bench = _bench()
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    res = bench.main([str(run_dir), "--batches", "2", "--md", str(md), "--json", str(js)])
    r = res["runs"][0]
    assert json.loads(js.read_text()) == json.loads(json.dumps({"runs": [r]}))
    assert "| L_p_con |" in md.read_text() and "| L_logic_rev |" in res["markdown"]
    assert list(r["mean"]) == ["L_kMaX", *CONTRASTIVE, "total"] and len(r["per_batch"]) == 2
    for name, row in r["mean"].items():
        assert set(row) == ROW | ({"weight"} if name != "total" else set()) | (FLOOR if name in CONTRASTIVE else set())
        assert all(math.isfinite(row[k]) for k in ROW), name
        assert row["grad_components"] >= row["grad_queries"] >= 0.0
        if name in CONTRASTIVE:  # the per-anchor losses never go below log |B(x)|
            assert 0.0 <= row["at_floor"] <= 1.0 and row["excess"] >= -1e-4 and row["anchors"] > 0
    assert r["mean"]["L_logic"]["grad_queries"] > 0
    assert r["mean"]["L_kMaX"]["cos_trunk_kmax"] == pytest.approx(1.0, abs=1e-6)
    assert r["mean"]["L_p_con"]["weight"] == 2.0 and r["mean"]["L_logic_rev"]["weight"] == 1.0

    # the same first batch through the method's own step, nothing recorded: its logs and its loss's
    # trunk gradient are the script's values
    run = api.load_run(run_dir, device="cpu")
    cfg, model = run.cfg, run.model
    batch = bench.fixed_batches(run.method, cfg, api.read_run(run_dir)["data"], run.info, 1, 0)[0]
    ctx = StepContext(cfg=cfg, info=run.info, step=r["step"], max_steps=cfg.train.max_steps, epoch=0,
                      steps_per_epoch=1, device=torch.device("cpu"), module=model, state=run.state)
    model.train()
    out = run.method.training_step(model, batch, ctx)
    first = r["per_batch"][0]
    for name, key in CONTRASTIVE.items():
        assert first[name]["value"] == pytest.approx(float(out[key]), rel=1e-5, abs=1e-6), name
    assert first["total"]["value"] == pytest.approx(float(out["loss"].detach()), rel=1e-5)
    trunk = [p for _, p in bench.param_groups(model)["trunk"]]
    g = torch.autograd.grad(out["loss"], trunk, allow_unused=True)
    norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in g if x is not None)))
    assert first["total"]["grad_trunk"] == pytest.approx(norm, rel=1e-3)


def test_a_term_switched_off_has_no_row_and_a_zero_weight_no_gradient(run_dir):
    bench = _bench()
    res = bench.main([str(run_dir), "--batches", "1", "--set", "cocal.o_con=false", "cocal.logic_reverse=false",
                      "cocal.w_p_con=0"])
    mean = res["runs"][0]["mean"]
    assert list(mean) == ["L_kMaX", "L_p_con", "L_logic", "total"]
    assert mean["L_p_con"]["value"] > 0
    assert mean["L_p_con"]["grad_trunk"] == mean["L_p_con"]["grad_queries"] == 0.0
    assert mean["L_logic"]["grad_queries"] > 0
    with pytest.raises(SystemExit, match="cocal.dictionary"):
        bench.main([str(run_dir), "--set", "cocal.dictionary=false"])
