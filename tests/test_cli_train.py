"""CLI: ``labelwise train`` errors, help, and ``torchrun --nproc_per_node=2 -m labelwise train`` on CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from labelwise.cli import main
from procs import explain


def test_unknown_set_key_exits_2_naming_closest(tmp_path, capsys):
    rc = main(["train", "cam", "--data", "voc:/nonexistent", "--out", str(tmp_path / "r"),
               "--set", "optim.lrr=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "optim.lr" in err and err.count("\n") == 1


def test_unknown_preset_and_method(tmp_path, capsys):
    assert main(["train", "cam", "--data", "voc:/x", "--out", str(tmp_path / "r"), "--preset", "gpu"]) == 2
    assert "available presets: cpu, voc" in capsys.readouterr().err
    assert main(["train", "nope", "--data", "voc:/x", "--out", str(tmp_path / "r")]) == 2
    assert "available methods" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_ranks_cpu(tmp_path):
    from labelwise.data.synth import generate

    root = generate("cooc", tmp_path / "c", n_train=8, n_val=2, size=32, seed=2)
    env = {**os.environ, "LABELWISE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "labelwise", "train", "cam",
           "--data", f"voc:{root}", "--out", str(tmp_path / "run"), "--steps", "2", "--set",
           "model.backbone=vit_tiny_test", "model.pretrained=false", "data.crop_size=32", "train.batch_size=4",
           "train.log_every=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, explain(r)
    assert json.loads((tmp_path / "run/run.json").read_text())["world_size"] == 2
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2]
    assert "val_miou" in json.loads((tmp_path / "run/metrics.json").read_text())["final"]


def test_preset_follows_the_dataset_and_never_silently_the_cpu_one(tmp_path, capsys):
    """Without --preset: a synthetic testbed trains the cpu preset, a voc: dataset the method's voc
    preset, a folder: dataset stops with one line listing the presets; the choice is printed and
    recorded in run.json."""
    import json
    import shutil

    from labelwise.data.synth import generate
    from labelwise.engine.api import choose_preset
    from labelwise.engine.registry import get_method

    tb = generate("cooc", tmp_path / "tb", n_train=4, n_val=2, size=32, seed=0)
    real = tmp_path / "VOC2012"
    shutil.copytree(tb, real)
    (real / "meta.json").unlink()  # a real VOC tree has no testbed metadata
    seco = get_method("seco")
    assert choose_preset(seco, f"voc:{tb}") == ("cpu", "the cooc synthetic testbed")
    assert choose_preset(seco, f"voc:{real}")[0] == "voc"
    assert choose_preset(seco, f"vocaug:{real}")[0] == "voc"
    assert choose_preset(get_method("oap"), f"coco:{real}")[0] == "coco"
    assert choose_preset(seco, f"voc:{real}", "cpu") == ("cpu", "--preset")
    capsys.readouterr()
    assert main(["train", "seco", "--data", f"folder:{real / 'JPEGImages'}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--preset is needed" in err and "coco, cpu, voc" in err
    assert main(["train", "cam", "--data", f"voc:{tb}", "--out", str(tmp_path / "run"), "--steps", "1", "--set",
                 "model.pretrained=false", "data.crop_size=32", "train.batch_size=2", "train.eval_at_end=false",
                 "--no-progress"]) == 0
    assert "cam preset 'cpu' (the cooc synthetic testbed)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["preset"] == "cpu"
