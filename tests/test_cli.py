"""Every command answers --help, and bad input gets one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from labelwise.cli import COMMANDS, main

SUBCOMMANDS = [
    ["data"], ["data", "synth"], ["data", "check"], ["train"], ["infer"], ["pseudo-masks"],
    ["evaluate"], ["explain"], ["run"], ["demo"], ["bench"], ["bench", "oap"], ["bench", "train"],
    ["bench", "infer"], ["bench", "crf"], ["bench", "seco"], ["bench", "cobra"], ["bench", "oap-train"],
    ["bench", "cocal"],
]
# commands that run a model take --device; every command that works takes --no-progress and,
# where it has settings, a repeatable dotted --set
RUNS_A_MODEL = [["train"], ["infer"], ["pseudo-masks"], ["evaluate"], ["explain"], ["run"], ["demo"], ["bench", "oap"],
                ["bench", "train"], ["bench", "infer"], ["bench", "seco"], ["bench", "cobra"], ["bench", "oap-train"],
                ["bench", "cocal"]]
WORKS = RUNS_A_MODEL + [["data", "synth"], ["data", "check"], ["bench", "crf"]]
HAS_SET = [["train"], ["infer"], ["pseudo-masks"], ["run"]]


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv + ["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", WORKS, ids=lambda a: " ".join(a))
def test_consistent_options(argv, capsys):
    text = _help(argv, capsys)
    assert "--no-progress" in text
    if argv in RUNS_A_MODEL:
        assert "--device" in text
    if argv in HAS_SET:
        assert "--set KEY=VALUE" in text


def test_repeated_set_keeps_every_value():
    from labelwise.cli import build_parser

    for argv in (["train", "cam", "--data", "x", "--out", "y"], ["infer", "r", "--data", "x", "--split", "s", "--out", "o"],
                 ["pseudo-masks", "oap", "--images", "x", "--out", "o.json"], ["run", "demo", "--out", "o"]):
        args = build_parser(only=argv[0]).parse_args(argv + ["--set", "a.b=1", "c=2", "--set", "d.e=3"])
        assert args.overrides == ["a.b=1", "c=2", "d.e=3"], argv


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, _, _ in COMMANDS:
        assert name in out


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=lambda a: " ".join(a))
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "labelwise", "evaluate", "semantic", "--pred", str(tmp_path / "nope"),
                           "--gt", f"voc:{tmp_path / 'missing'}", "--split", "val"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labelwise: error:"), proc.stderr


def test_no_progress_and_device_take_effect(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LABELWISE_NO_PROGRESS", raising=False)
    monkeypatch.delenv("LABELWISE_PROGRESS", raising=False)
    assert main(["data", "synth", "cooc", str(tmp_path / "x"), "--train", "2", "--val", "1", "--size", "32"]) == 0
    assert "synth cooc train" not in capsys.readouterr().err  # stderr is not a terminal: no bars (slurm logs)
    monkeypatch.setenv("LABELWISE_PROGRESS", "1")
    assert main(["data", "synth", "cooc", str(tmp_path / "a"), "--train", "2", "--val", "1", "--size", "32"]) == 0
    assert "synth cooc train" in capsys.readouterr().err  # forced on
    monkeypatch.delenv("LABELWISE_NO_PROGRESS", raising=False)
    assert main(["data", "synth", "cooc", str(tmp_path / "b"), "--train", "2", "--val", "1", "--size", "32",
                 "--no-progress"]) == 0
    assert "synth cooc train" not in capsys.readouterr().err
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    assert main(["train", "cam", "--data", f"voc:{tmp_path / 'a'}", "--out", str(tmp_path / "r"), "--steps", "1",
                 "--device", "cpu", "--set", "model.backbone=vit_tiny_test", "model.pretrained=false",
                 "data.crop_size=32", "train.batch_size=2", "train.eval_at_end=false"]) == 0
    assert "device: cpu" in (tmp_path / "r/config.yaml").read_text()
    capsys.readouterr()
    assert main(["infer", str(tmp_path / "r"), "--data", f"voc:{tmp_path / 'a'}", "--split", "val", "--out",
                 str(tmp_path / "p"), "--device", "cuda:7"]) == 2  # the device reaches the model (none here)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda:7'" in err


def test_unwritable_and_file_valued_outputs_end_in_one_line(tmp_path, capsys):
    """An output path where a file stands (or under a file) ends in one line naming it, exit 2, no
    traceback: train / infer --out, evaluate --json, show --out, data synth, pseudo-masks --out."""
    from labelwise.data.synth import generate

    tb = generate("cooc", tmp_path / "tb", n_train=4, n_val=2, size=32, seed=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run = tmp_path / "run"
    assert main(["train", "cam", "--data", f"voc:{tb}", "--out", str(run), "--steps", "1", "--preset", "cpu",
                 "--set", "model.pretrained=false", "data.crop_size=32", "train.batch_size=2",
                 "train.eval_at_end=false", "--no-progress"]) == 0
    assert main(["infer", str(run), "--data", f"voc:{tb}", "--split", "val", "--out", str(tmp_path / "pred"),
                 "--what", "seeds", "--no-progress"]) == 0
    capsys.readouterr()
    cases = [
        ["train", "cam", "--data", f"voc:{tb}", "--out", str(blocker / "run"), "--steps", "1", "--preset", "cpu"],
        ["infer", str(run), "--data", f"voc:{tb}", "--split", "val", "--out", str(blocker / "p"), "--what", "seeds"],
        ["evaluate", "semantic", "--pred", str(tmp_path / "pred"), "--gt", f"voc:{tb}", "--split", "val",
         "--json", str(tmp_path)],
        ["show", str(tmp_path / "pred"), "--images", str(tb / "JPEGImages"), "--out", str(blocker / "g")],
        ["data", "synth", "cooc", str(blocker / "t"), "--train", "2", "--val", "1", "--size", "32"],
    ]
    for argv in cases:
        assert main(argv + (["--no-progress"] if argv[0] in ("train", "infer", "show") else [])) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("labelwise: error: ") and "Traceback" not in err, (argv, err)
        assert str(blocker) in err or str(tmp_path) in err, (argv, err)


def test_the_python_api_examples_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of docs/api.md, in order, in an empty folder (the page promises it)."""
    import re

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    scope: dict = {}
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), scope)


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every `labelwise` line of the README's Quick start and "See your masks" blocks, in order, in
    an empty folder (only /tmp/cooc moved into it), exits 0 and leaves what the README promises."""
    import json
    import re
    import shlex

    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Quick start"):text.index("## Commands")]
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) for ln in block.splitlines()]
    commands = [shlex.split(ln.replace("/tmp/cooc", str(tmp_path / "cooc")), comments=True) for ln in lines
                if ln.startswith("labelwise ")]
    assert [c[1] for c in commands][:3] == ["data", "train", "infer"] and len(commands) >= 7
    assert all(ln.startswith(("labelwise ", "pip install")) for ln in lines if ln.strip()), lines
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    capsys.readouterr()
    assert (tmp_path / "runs/cam/checkpoints/last.pt").is_file()
    n_train = len((tmp_path / "cooc/ImageSets/Segmentation/train.txt").read_text().split())
    assert len(list((tmp_path / "pred/train").glob("*.png"))) == len(list((tmp_path / "pred/train").glob("*.npz"))) \
        == n_train
    assert 0.0 < json.loads((tmp_path / "m.json").read_text())["miou"] <= 1.0
    assert isinstance(json.loads((tmp_path / "oap.json").read_text()), list)
    for gallery in ("show/oap", "show/cam"):
        assert (tmp_path / gallery / "index.html").is_file(), gallery
