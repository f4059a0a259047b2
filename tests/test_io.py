from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from labelwise.errors import LabelwiseError
from labelwise.io import (
    VOC_PALETTE, atomic_write_json, list_images, read_image, read_label, write_label,
)


def test_voc_palette_known_colours():
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[2].tolist() == [0, 128, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]  # person
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]  # VOC's ignore/boundary colour


def test_label_roundtrip_palette_and_gray(tmp_path):
    lab = np.random.default_rng(0).integers(0, 21, (13, 17)).astype(np.uint8)
    lab[0, 0] = 255
    write_label(tmp_path / "a.png", lab)
    assert Image.open(tmp_path / "a.png").mode == "P"
    np.testing.assert_array_equal(read_label(tmp_path / "a.png"), lab)
    Image.fromarray(lab, mode="L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_label(tmp_path / "g.png"), lab)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelwiseError, match=r"rgb.png: label PNG has mode RGB"):
        read_label(tmp_path / "rgb.png")


def test_read_image_modes(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    g = read_image(tmp_path / "gray.png")
    assert g.shape == (6, 5, 3) and (g[..., 1] == rgb[..., 0]).all()
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # fully transparent -> white background
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [255, 255, 255] and (out[1:, 1:] == rgb[1:, 1:]).all()
    sixteen = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000)
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    s = read_image(tmp_path / "16.png")
    assert s.dtype == np.uint8 and s[0, 0, 0] == 0 and s[-1, -1, 0] == round(58000 / 65535 * 255)


def test_exif_orientation_applied(tmp_path):
    img = np.zeros((4, 8, 3), np.uint8)
    img[:, :4] = 255  # left half white
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    pil.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (8, 4, 3)
    assert out[:3].mean() > 200 and out[-3:].mean() < 50  # white half is now on top


def test_corrupt_image_message(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(LabelwiseError, match=r"bad.jpg: corrupt or unreadable image"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(LabelwiseError, match=r"nope.jpg: file not found"):
        read_image(tmp_path / "nope.jpg")


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_json(tmp_path / "x" / "a.json", {"a": 1})
    assert (tmp_path / "x" / "a.json").read_text().strip().startswith("{")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["a.json"]


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "sub/a.PNG", "c.txt", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["b.jpg", "sub/a.PNG"]
    with pytest.raises(LabelwiseError, match="image folder not found"):
        list_images(tmp_path / "missing")


def test_outputs_follow_the_umask_like_any_new_file(tmp_path):
    """Atomic writes keep the umask's permissions (0o644 under 022), not mkstemp's owner-only 0o600."""
    import os
    import stat
    import subprocess
    import sys

    code = ("import sys; from labelwise.io import atomic_write_text, atomic_write_json; "
            "atomic_write_text(sys.argv[1] + '/a.txt', 'x'); atomic_write_json(sys.argv[1] + '/b.json', {}); "
            "open(sys.argv[1] + '/plain.txt', 'w').close()")
    for umask, want in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        out = tmp_path / oct(umask)
        out.mkdir()
        subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); " + code, str(out)], check=True,
                       env={**os.environ})
        for name in ("a.txt", "b.json", "plain.txt"):
            assert stat.S_IMODE((out / name).stat().st_mode) == want, (oct(umask), name)
