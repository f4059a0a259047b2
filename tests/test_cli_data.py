"""``labelwise data synth|check`` from the command line."""

from __future__ import annotations

import json

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


def test_check_reports_problems(tmp_path, capsys, monkeypatch):
    calls = []

    class Fake:
        class_names = ["background", "a"]

        def __len__(self):
            return 4

    def build(spec, split):
        calls.append((spec, split))
        return Fake()

    monkeypatch.setattr(data, "build_dataset", build, raising=False)
    monkeypatch.setattr(data, "validate", lambda ds: [("x/1.png", "label value 9 >= 2 classes")], raising=False)
    rc = main(["data", "check", "voc:/somewhere", "--split", "val"])
    out, err = capsys.readouterr()
    assert rc == 1 and calls == [("voc:/somewhere", "val")]
    assert "x/1.png: label value 9" in out and "1 problem" in err
    monkeypatch.setattr(data, "validate", lambda ds: [], raising=False)
    assert main(["data", "check", "voc:/somewhere"]) == 0
    assert "OK (4 images, 2 classes)" in capsys.readouterr().out
    assert calls[-1] == ("voc:/somewhere", "train")


@pytest.mark.skipif(not (hasattr(data, "build_dataset") and hasattr(data, "validate")),
                    reason="labelwise.data.build_dataset/validate not available")
@pytest.mark.parametrize("kind, fmt", [("cooc", "voc"), ("parts", "parts"), ("objects", "coco")])
def test_check_accepts_generated_testbeds(tmp_path, capsys, kind, fmt):
    out = tmp_path / kind
    assert main(["data", "synth", kind, str(out), "--train", "3", "--val", "2", "--size", "48"]) == 0
    for split in ("train", "val"):
        assert main(["data", "check", f"{fmt}:{out}", "--split", split]) == 0, capsys.readouterr()
