"""Every registered method keeps the engine's contract: ``torchrun --nproc_per_node=2`` trains its
``cpu`` preset on its testbed; a finished run infers from a folder moved elsewhere with no
pretrained-weights file anywhere; loading a run leaves the global RNG alone; plugin methods
(``LABELWISE_PLUGINS``) train under torchrun like built-ins. A method that refines CAM seeds
(``Method.needs_seeds``, e.g. ``irn``) gets seeds made from the testbed's masks (blurred and
scaled: a stand-in for any method's CAMs) with ``--seeds`` for training and inference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labelwise.engine.registry import get_method, list_methods
from procs import explain

TESTS = Path(__file__).resolve().parent
METHODS = [m for m in list_methods() if not m.startswith("_")]  # "_name": test-only plugins
TORCHRUN = shutil.which("torchrun") is not None


def _env(**extra):
    return {**os.environ, "LABELWISE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def testbeds(tmp_path_factory):
    from labelwise.data.synth import generate, testbed_spec

    root = tmp_path_factory.mktemp("testbeds")
    kinds = {get_method(m).testbed for m in METHODS}
    return {k: testbed_spec(k, generate(k, root / k, n_train=8, n_val=3, size=64, seed=0)) for k in kinds}


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN, reason="torchrun not installed")
@pytest.mark.parametrize("name", METHODS)
def test_torchrun_two_ranks_train_the_cpu_preset_then_a_moved_run_infers(name, testbeds, tmp_path, monkeypatch):
    method = get_method(name)
    spec = testbeds[method.testbed]
    run = tmp_path / "run"
    seeds = {}
    if method.needs_seeds:
        from labelwise.data.synth import mask_seeds

        seeds = {split: str(mask_seeds(spec, split, tmp_path / f"seeds-{split}")) for split in ("train", "val")}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "labelwise", "train", name, "--data", spec,
           "--out", str(run), "--preset", "cpu", "--steps", "2", "--set", "train.batch_size=4", "train.log_every=1",
           "--no-progress"] + (["--seeds", seeds["train"]] if seeds else [])
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, explain(r)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]

    # move the run; forbid every way of reading pretrained weights: the checkpoint must be enough
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(run), moved)
    from labelwise.modeling.backbones import backbone as bb_module

    real = bb_module._load_weights

    def no_weights(model, name_, spec_, pretrained, weights, *rest):
        assert not pretrained and weights is None, "inference tried to load pretrained weights"
        return real(model, name_, spec_, pretrained, weights, *rest)

    monkeypatch.setattr(bb_module, "_load_weights", no_weights)
    from labelwise.engine import api

    state = torch.get_rng_state()
    loaded = api.load_run(moved, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # loading a run leaves the global RNG alone
    ck = torch.load(moved / "checkpoints/last.pt", map_location="cpu", weights_only=False)
    sd = loaded.model.state_dict()
    teacher = {k[len("module."):]: v for k, v in (ck.get("ema") or {}).items() if k.startswith("module.")}
    # the loaded weights are exactly the checkpoint's student or its EMA teacher (which may have the
    # student's keys, e.g. oap's teacher is an EMA of the whole network)
    assert any(set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
               for expected in (ck["model"], teacher) if expected)
    out = tmp_path / "pred"
    api.infer(moved, spec, "val", out, device="cpu", show_progress=False, seeds=seeds.get("val"))
    assert len([p for p in out.rglob("*") if p.is_file() and p.name != "skipped.txt"]) >= 3


@pytest.mark.skipif("cam" not in METHODS, reason="cam not shipped")
def test_cam_run_infers_after_its_weights_file_is_gone(testbeds, tmp_path):
    """A run trained from a local weights file (model.weights, stored absolute) still infers when
    the file and the run folder have moved."""
    from labelwise.modeling.backbones.weights import shipped_weights_path

    weights = tmp_path / "w" / "lite0.pth"
    weights.parent.mkdir()
    shutil.copy(shipped_weights_path("tf_efficientnet_lite0"), weights)
    run = tmp_path / "run"
    rel = os.path.relpath(weights, Path.cwd())
    args = [sys.executable, "-m", "labelwise", "train", "cam", "--data", testbeds["cooc"], "--out", str(run),
            "--steps", "1", "--set", f"model.weights={rel}", "train.batch_size=2", "train.eval_at_end=false",
            "--no-progress"]
    r = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, explain(r)
    assert f"weights: {weights}" in (run / "config.yaml").read_text()  # a path-valued key, stored absolute
    shutil.rmtree(weights.parent)
    moved = tmp_path / "moved"
    shutil.move(str(run), moved)
    r = subprocess.run([sys.executable, "-m", "labelwise", "infer", str(moved), "--data", testbeds["cooc"],
                        "--split", "val", "--out", str(tmp_path / "pred"), "--what", "masks,seeds", "--no-progress"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, explain(r)
    assert len(list((tmp_path / "pred").glob("*.png"))) == len(list((tmp_path / "pred").glob("*.npz"))) == 3


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN, reason="torchrun not installed")
def test_plugin_method_trains_under_torchrun(tmp_path):
    env = _env(LABELWISE_PLUGINS="toy_method", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "labelwise", "train", "_toy_staged", "--data",
           "toy:x", "--out", str(tmp_path / "run"), "--steps", "4", "--set", "train.batch_size=4", "loss.stage_step=1",
           "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, explain(r)
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4] and "nce" in log[-1]
    bad = subprocess.run([sys.executable, "-m", "labelwise", "train", "_toy", "--data", "toy:x", "--out",
                          str(tmp_path / "r2")], env=_env(LABELWISE_PLUGINS="no_such_plugin"), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "LABELWISE_PLUGINS names module 'no_such_plugin'" in bad.stderr
    assert bad.stderr.count("\n") == 1
