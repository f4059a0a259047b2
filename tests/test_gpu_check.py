"""bench/gpu_check.py, the project's one GPU script, tested without a GPU. The plan trains every
method on its paper preset at the preset's crop and batch size. The dry run (CPU, tiny sizes,
1 thread) writes an entry for every planned check, with finite losses and positive step times
for fp32 and bf16. A failing check is recorded with its one line, and the checks after it run."""

import json
import math

import bench_scripts
import pytest

gpu_check = bench_scripts.load("gpu_check")


def test_plan_trains_every_method_on_its_paper_preset():
    from labelwise.config import to_dict
    from labelwise.engine.api import resolve_method_config
    from labelwise.engine.registry import BUILTIN_METHODS, get_method

    checks = gpu_check.plan()
    train = {c["method"]: c for c in checks if c["kind"] == "train"}
    assert sorted(train) == sorted(BUILTIN_METHODS)                      # every method, once
    for name, c in train.items():
        method = get_method(name)
        paper = [p for p in method.presets() if p != "cpu"]
        first = next(p for p in gpu_check.PRESET_ORDER + tuple(paper) if p in paper)
        assert c["preset"] == first
        cfg = to_dict(resolve_method_config(method, first))
        assert (c["crop_size"], c["batch_size"]) == (cfg["data"]["crop_size"], cfg["train"]["batch_size"])
        hub = [f"model.{k}" for k, v in cfg["model"].items() if k.endswith("pretrained") and v]
        assert c["pretrained_off"] == sorted(hub) and all(f"{k}=false" in c["overrides"] for k in hub)
        assert "train.device=cuda" in c["overrides"] and "data.crop_size=64" not in c["overrides"]
    assert {c["name"] for c in gpu_check.plan(all_presets=True) if c["kind"] == "train"} == {
        f"train:{m}:{p}" for m in sorted(BUILTIN_METHODS) for p in get_method(m).presets() if p != "cpu"}
    names = [c["name"] for c in checks]
    assert {"infer:cam", "infer:oap", "bench:oap", "tests:oap-static"} <= set(names)
    assert names.index("train:cam:voc") < names.index("infer:cam") < names.index("train:irn:voc")
    with pytest.raises(gpu_check.CheckError, match="irn trains on the seeds of cam"):
        gpu_check.plan(["irn"])


def test_dry_run_writes_every_check_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")                             # the children: one thread each
    real_plan = gpu_check.plan

    def plan_with_a_broken_check(*a, **kw):  # an inference check of a run that never was: fails first
        return [{"name": "infer:broken", "kind": "infer", "method": "cam", "run_of": "train:none",
                 "testbed": "cooc", "what": "seeds", "seeds_for": []}] + real_plan(*a, **kw)

    monkeypatch.setattr(gpu_check, "plan", plan_with_a_broken_check)
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--methods", "cam,irn", "--jobs", "1"])
    res = json.loads((tmp_path / gpu_check.RESULTS_NAME).read_text())
    assert rc == 1 and res["ok"] is False                       # the broken check fails the run ...
    broken = res["checks"].pop("infer:broken")
    assert not broken["ok"] and "train:none" in broken["error"] and "\n" not in broken["error"]
    assert res["planned"] == ["testbeds", "infer:broken", "train:cam:voc", "infer:cam", "bench:oap",
                              "tests:oap-static", "train:irn:voc"]
    assert {k: v["ok"] for k, v in res["checks"].items()} == dict.fromkeys(res["planned"][:1] + res["planned"][2:],
                                                                           True)  # ... and every other one ran
    assert res["device"] == "cpu" and res["device_name"] and res["torch"] and res["mode"].startswith("dry-run")
    for name in ("train:cam:voc", "train:irn:voc"):
        entry = res["checks"][name]
        assert entry["pretrained_off"] and entry["weights"].startswith("random")
        for precision, amp in (("fp32", "none"), ("bf16", "bf16")):
            run = entry["runs"][precision]
            assert run["ok"] and run["amp"] == amp and run["loss_finite"] and math.isfinite(run["loss_last"])
            assert run["ms_per_step"] > 0 and run["timed_steps"] >= 1 and run["peak_mem_mb"] > 0
    calls = res["checks"]["infer:cam"]["calls"]
    assert [calls[k]["batch_size"] for k in ("val_batch_1", "val_batched")] == [1, 2]
    assert all(c["images"] > 0 and c["images_per_s"] > 0 for c in calls.values())
    bench = res["checks"]["bench:oap"]
    assert bench["oap_ms_per_image"] > 0 and bench["maskcut_over_oap"] > 0
    tests = res["checks"]["tests:oap-static"]
    assert tests["failed"] == 0 and tests["passed"] + tests["skipped"] >= 1


@pytest.mark.parametrize("accumulates,tried,final", [
    (True, [(64, None), (64, 32), (64, 16)], (64, 16)),     # the paper's batch, the rest accumulated
    (False, [(64, None), (32, None), (16, None)], (16, 16)),  # a method that cannot accumulate: a smaller batch
])
def test_out_of_memory_halves_the_images_per_forward(tmp_path, monkeypatch, accumulates, tried, final):
    """The GPU-only path, with a fake trainer that runs out of memory above 16 images per forward."""
    import torch

    from labelwise.engine import api

    calls = []

    def fake_train(method, spec, run_dir, *, overrides, hooks, **kw):
        sets = dict(o.split("=", 1) for o in overrides)
        batch, per_forward = int(sets["train.batch_size"]), sets.get("train.batch_per_gpu")
        calls.append((batch, per_forward and int(per_forward)))
        if int(per_forward or batch) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        run_dir.mkdir(parents=True)
        (run_dir / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
        for step in range(1, 10):
            hooks[0](None, step)                               # raises StopRun after the timed steps

    monkeypatch.setattr(api, "train", fake_train)
    job = {"method": "kmax", "preset": "pascalpart", "spec": "parts:x", "seeds": None, "overrides": [],
           "batch_size": 64, "accumulates": accumulates, "warmup": 1, "steps": 2, "least_timed": 1,
           "run_budget_s": 60.0, "save": False, "work": str(tmp_path)}
    run = gpu_check.train_once(job, "bf16", torch.device("cpu"))
    assert calls == tried
    assert run["ok"] and (run["batch_size"], run["per_forward"]) == final and len(run["oom_at"]) == 2
    assert run["timed_steps"] == 2 and run["ms_per_step"] > 0 and run["loss_last"] == 0.4
    job["batch_size"] = 256                                   # still too large after two halvings: recorded
    run = gpu_check.train_once(job, "fp32", torch.device("cpu"))
    assert not run["ok"] and run["error"].startswith("out of memory: ") and run["ms_per_step"] is None
