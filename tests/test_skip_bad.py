"""A bad training image stops `labelwise train` with one line naming it; --skip-bad skips it,
warns with the count and lists it in RUN_DIR/skipped.txt."""

from __future__ import annotations

import pytest

from labelwise.cli import main

TINY = ["--steps", "1", "--no-progress", "--set", "model.backbone=vit_tiny_test", "model.pretrained=false",
        "data.crop_size=32", "train.batch_size=2", "train.eval_at_end=false", "train.num_workers=0"]


@pytest.fixture()
def broken(tmp_path):
    from labelwise.data.synth import generate

    root = generate("cooc", tmp_path / "c", n_train=6, n_val=2, size=32, seed=3)
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[2]}.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    return root, ids[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_is_one_line_error(broken, tmp_path, capsys, workers):
    """Also from a DataLoader worker process, whose re-raise carries the worker's traceback."""
    root, bad = broken
    rc = main(["train", "cam", "--data", f"voc:{root}", "--out", str(tmp_path / "run"), "--steps", "3"]
              + TINY[2:-1] + [f"train.num_workers={workers}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"{bad}.jpg" in err[0] and "corrupt or unreadable image" in err[0]


def test_skip_bad_skips_and_reports(broken, tmp_path):
    root, bad = broken
    with pytest.warns(UserWarning, match=r"skipped 1 bad item\(s\) of 6"):
        rc = main(["train", "cam", "--data", f"voc:{root}", "--out", str(tmp_path / "run"), "--skip-bad"] + TINY)
    assert rc == 0
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and f"{bad}.jpg" in listed[0]
    assert "skip_bad: true" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.fixture()
def truncated(tmp_path):
    """A JPEG whose header is intact and whose data stops half way: a header read passes it."""
    from labelwise.data.synth import generate

    root = generate("cooc", tmp_path / "t", n_train=6, n_val=2, size=64, seed=3)
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    path = root / "JPEGImages" / f"{ids[1]}.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return root, ids[1]


def test_truncated_image_is_found_by_data_check_and_skipped_by_skip_bad(truncated, tmp_path, capsys):
    root, bad = truncated
    assert main(["data", "check", f"voc:{root}", "--split", "train"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}.jpg" in out
    assert main(["data", "check", f"voc:{root}", "--split", "train", "--headers-only"]) == 0  # the fast mode misses it
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"skipped 1 bad item\(s\) of 6"):
        assert main(["train", "cam", "--data", f"voc:{root}", "--out", str(tmp_path / "run"), "--skip-bad"] + TINY) == 0
    assert f"{bad}.jpg" in (tmp_path / "run" / "skipped.txt").read_text()
