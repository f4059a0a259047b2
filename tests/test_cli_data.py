"""``labelwise data synth|check`` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import labelwise.data as data
from labelwise.cli import main


def test_synth_writes_testbed_and_meta(tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["data", "synth", "cooc", str(out), "--train", "3", "--val", "2", "--size", "40", "--seed", "5",
               "--context-rate", "0.6", "--opt", "pair_rate=0.9"])
    assert rc == 0
    assert "voc:" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["size"] == 40 and meta["splits"] == {"train": 3, "val": 2}
    assert meta["options"]["context_rate"] == 0.6 and meta["options"]["pair_rate"] == 0.9
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 5


@pytest.mark.parametrize("argv, needle", [
    (["--size", "16"], "--size"),
    (["--train", "-2"], "--train"),
    (["--opt", "contxt_rate=0.5"], "context_rate"),
    (["--opt", "noequals"], "KEY=VALUE"),
    (["--opt", "context_rate=2"], "out of range"),
])
def test_synth_bad_input_is_one_line_error(tmp_path, capsys, argv, needle):
    rc = main(["data", "synth", "cooc", str(tmp_path / "x"), "--train", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("labelwise: error:") and "\n" not in err and needle in err


def test_synth_refuses_foreign_nonempty_dir(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    assert main(["data", "synth", "objects", str(tmp_path), "--train", "1", "--val", "0", "--size", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "synth", "objects", str(tmp_path), "--train", "1", "--val", "0", "--size", "32",
                 "--overwrite"]) == 0
    assert (tmp_path / "annotations" / "instances_train.json").is_file() and (tmp_path / "f.txt").is_file()


def test_cooc_only_flags_rejected_for_other_kinds(tmp_path, capsys):
    assert main(["data", "synth", "parts", str(tmp_path / "p"), "--pair-rate", "0.5"]) == 2
    assert "cooc" in capsys.readouterr().err


def test_help_states_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "default 200" in text and "default 50" in text and "default 128" in text
    assert "context_rate" in text and "touch_rate" in text


def test_check_reports_problems(tmp_path, capsys):
    """A real testbed with real defects: each bad file is listed with its reason, exit code 1."""
    from PIL import Image

    from labelwise.io import write_label

    root = tmp_path / "c"
    assert main(["data", "synth", "cooc", str(root), "--train", "4", "--val", "2", "--size", "48"]) == 0
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    write_label(root / "SegmentationClass" / f"{ids[0]}.png", np.full((48, 48), 42, np.uint8))  # 42 >= 11 classes
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg")
    Image.new("P", (20, 48)).save(root / "SegmentationClass" / f"{ids[2]}.png")  # wrong size
    capsys.readouterr()
    rc = main(["data", "check", f"voc:{root}", "--split", "train"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert any(f"{ids[0]}.png" in ln and "label value 42" in ln for ln in lines)
    assert any(f"{ids[1]}.jpg" in ln and "corrupt" in ln for ln in lines)
    assert any(f"{ids[2]}.png" in ln and "differs from image size" in ln for ln in lines)
    assert "3 problem" in err
    # the untouched split is clean, and the default split is train
    assert main(["data", "check", f"voc:{root}", "--split", "val"]) == 0
    assert "OK (2 images, 11 classes)" in capsys.readouterr().out
    assert main(["data", "check", f"voc:{root}"]) == 1


@pytest.mark.skipif(not (hasattr(data, "build_dataset") and hasattr(data, "validate")),
                    reason="labelwise.data.build_dataset/validate not available")
@pytest.mark.parametrize("kind, fmt", [("cooc", "voc"), ("parts", "parts"), ("objects", "coco")])
def test_check_accepts_generated_testbeds(tmp_path, capsys, kind, fmt):
    out = tmp_path / kind
    assert main(["data", "synth", kind, str(out), "--train", "3", "--val", "2", "--size", "48"]) == 0
    for split in ("train", "val"):
        assert main(["data", "check", f"{fmt}:{out}", "--split", split]) == 0, capsys.readouterr()
