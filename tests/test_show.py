"""``labelwise show``: overlays of results json / label PNGs / parts folders (+ ground truth) and
the self-contained HTML gallery."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelwise.cli import main
from labelwise.io import read_image, write_label
from labelwise.masks import encode_mask
from labelwise.report.show import (compose_row, detect_pred_kind, draw_label_map, draw_masks, match_results,
                                   show_predictions, top_k_by_level)

H = W = 64
TITLE, GAP = 16, 6  # compose_row's title strip and gap


def _images(root: Path, names=("a.png", "b.png", "c.png")) -> list[np.ndarray]:
    """Small lossless images (a smooth gradient plus a per-image offset) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for k, name in enumerate(names):
        img = np.stack([40 + xx, 60 + yy, np.full_like(xx, 90 + 20 * k)], axis=-1).astype(np.uint8)
        Image.fromarray(img).save(root / name)
        out.append(img)
    return out


def _box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _rec(mask, score, **kw) -> dict:
    return {"segmentation": encode_mask(mask), "score": score, "category_id": 1, **kw}


def _panel(row: np.ndarray, k: int) -> np.ndarray:
    """Panel ``k`` of an ``OUT/<stem>.png`` row (images not resized: 64 px < --max-side)."""
    x = k * (W + GAP)
    return row[TITLE:TITLE + H, x:x + W]


def _html_images(html: str) -> tuple[int, int]:
    return html.count("<img"), len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', html))


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------- drawing


def test_draw_masks_changes_inside_keeps_outside():
    img = np.full((H, W, 3), 100, dtype=np.uint8)
    m = _box(20, 44, 20, 44)
    plain = draw_masks(img, m[None], numbers=False)
    assert (plain[m] != img[m]).any(axis=-1).all()          # every mask pixel changed
    assert (plain[~m] == img[~m]).all()                     # outline lies inside: outside untouched
    numbered = draw_masks(img, m[None])
    far = np.ones((H, W), dtype=bool)
    far[8:56, 8:56] = False                                 # away from the mask and its number box
    assert (numbered[far] == img[far]).all()
    assert (numbered[m] != img[m]).any(axis=-1).all()


def test_draw_masks_overlap_best_on_top_and_outline():
    img = np.full((H, W, 3), 100, dtype=np.uint8)
    best, worse = _box(10, 40, 10, 40), _box(20, 50, 20, 50)
    out = draw_masks(img, np.stack([best, worse]), colors=np.array([[255, 0, 0], [0, 0, 255]]), numbers=False)
    assert out[25, 25, 0] > out[25, 25, 2]                  # overlap: the first (best) mask's colour
    assert tuple(out[10, 20]) == (255, 0, 0)                # 1-px outline in the solid colour
    assert tuple(out[49, 45]) == (0, 0, 255)
    assert tuple(out[45, 45]) != (0, 0, 255)                # interior: blended, not solid


def test_draw_label_map_background_and_clusters():
    img = np.full((H, W, 3), 100, dtype=np.uint8)
    lab = np.zeros((H, W), dtype=np.uint8)
    lab[10:30, 10:30] = 3
    lab[40:50, 40:50] = 255
    out = draw_label_map(img, lab)
    fg = lab == 3
    assert (out[fg] != img[fg]).any(axis=-1).all() and (out[lab == 0] == img[lab == 0]).all()
    clusters = draw_label_map(img, lab, background=False)   # 0 is a cluster: drawn too; 255 = none
    assert (clusters[lab == 0] != img[lab == 0]).any(axis=-1).all()


def test_top_k_and_matching_units():
    recs = [{"score": s, "level": lv, "segmentation": {}} for s, lv in
            [(0.1, "instance"), (0.9, "instance"), (0.5, None), (0.7, "instance"), (0.3, "semantic")]]
    top = top_k_by_level(recs, 2)
    assert [r["score"] for r in top["instance"][0]] == [0.9, 0.7] and top["instance"][1] == 4  # no level = instance
    assert [r["score"] for r in top["semantic"][0]] == [0.3]
    names = ["a.png", "sub/b.png", "c.png"]
    per, unmatched = match_results([{"file_name": "sub/b.png"}, {"file_name": "./a.png"}, {"image_id": 3},
                                    {"image_id": 4}, {"file_name": "zzz.png", "image_id": 1},
                                    {"file_name": "data/sub/b.png"}], names)
    assert [len(p) for p in per] == [1, 2, 1] and len(unmatched) == 2


# --------------------------------------------------------------------------- the command


def test_results_json_topk_match_and_gallery(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    m_a = _box(8, 28, 8, 28)
    recs = [_rec(m_a, 0.9, file_name="a.png", level="instance", image_id=7)]   # file_name wins over image_id
    scores = [0.2, 0.8, 0.5, 0.95, 0.1]
    for k, s in enumerate(scores):                                             # b by image_id only
        recs.append(_rec(_box(4 + 11 * k, 12 + 11 * k, 30, 60), s, image_id=2, level="instance"))
    recs.append(_rec(_box(0, 32, 0, 64), 0.4, image_id=2, level="semantic"))
    recs += [_rec(m_a, 0.5, image_id=9), _rec(m_a, 0.5, file_name="missing.png")]  # unmatched
    pred = tmp_path / "res.json"
    pred.write_text(json.dumps(recs))
    out = tmp_path / "show"
    rc, stdout, err = _run(["show", str(pred), "--images", str(tmp_path / "imgs"), "--out", str(out), "--top", "3"],
                           capsys)
    assert rc == 0, err
    assert "wrote 3 overlays" in stdout
    warn = [ln for ln in err.splitlines() if "match no image" in ln]
    assert len(warn) == 1 and "2 of 9 records" in warn[0]
    # a: matched by file_name; panels = image, instance, semantic
    row_a = np.asarray(Image.open(out / "a.png").convert("RGB"))
    assert row_a.shape == (TITLE + H, 3 * W + 2 * GAP, 3)
    assert (_panel(row_a, 0) == imgs[0]).all()
    inst = _panel(row_a, 1)
    assert (inst[m_a] != imgs[0][m_a]).any(axis=-1).all()
    far = np.ones((H, W), dtype=bool)
    far[:40, :40] = False
    assert (inst[far] == imgs[0][far]).all()
    assert (_panel(row_a, 2) == imgs[0]).all()                                 # a has no semantic mask
    # b: matched by image_id; only the 3 best of 5 instance masks are drawn
    row_b = np.asarray(Image.open(out / "b.png").convert("RGB"))
    inst_b = _panel(row_b, 1)
    for k, s in enumerate(scores):
        m = _box(4 + 11 * k, 12 + 11 * k, 30, 60)
        changed = (inst_b[m] != imgs[1][m]).any(axis=-1)
        assert changed.all() if s in sorted(scores)[-3:] else not changed.any(), (k, s)
    sem_b = _panel(row_b, 2)
    assert (sem_b[:32] != imgs[1][:32]).any(axis=-1).all() and (sem_b[40:] == imgs[1][40:]).all()
    # c: no predictions, still shown
    assert (out / "c.png").is_file()
    html = (out / "index.html").read_text()
    n_img, n_data = _html_images(html)
    assert n_img == n_data == 3 * 3                                            # one <img> per panel
    assert not re.search(r'(src|href)="(?!data:|#)', html) and "http" not in html
    assert str(pred) in html and "no masks" in html and "0.950" in html and "0.100" not in html


def test_max_images_and_python_api(tmp_path):
    _images(tmp_path / "imgs")
    pred = tmp_path / "res.json"
    pred.write_text(json.dumps([_rec(_box(0, 10, 0, 10), 0.5, file_name="c.png")]))
    s = show_predictions(pred, tmp_path / "imgs", tmp_path / "o", max_images=2, progress=False)
    assert s["images"] == 2 and s["images_total"] == 3 and s["unmatched"] == 0 and s["masks_drawn"] == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "b.png", "index.html"]
    # pages: 3 images, 2 per page -> index.html (a, b) and page-2.html (c), linked both ways
    s = show_predictions(pred, tmp_path / "imgs", tmp_path / "p", progress=False, per_page=2)
    assert s["pages"] == 2
    first, second = (tmp_path / "p" / "index.html").read_text(), (tmp_path / "p" / "page-2.html").read_text()
    assert "page-2.html" in first and "index.html" in second and "page 2 of 2" in second
    assert first.count("<h3>") == 2 and second.count("<h3>") == 1


def test_label_png_folder(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs")
    pred = tmp_path / "pred"
    lab = np.zeros((H, W), dtype=np.uint8)
    lab[10:30, 10:40] = 2
    lab[50:60, 50:60] = 255
    write_label(pred / "a.png", lab)
    write_label(pred / "b.png", np.ones((H, W), dtype=np.uint8))
    write_label(pred / "stray.png", lab)
    assert detect_pred_kind(pred) == "labels"
    out = tmp_path / "show"
    rc, _, err = _run(["show", str(pred), "--images", str(tmp_path / "imgs"), "--out", str(out)], capsys)
    assert rc == 0, err
    assert "1 of 3 label PNGs match no image" in err
    panel = _panel(np.asarray(Image.open(out / "a.png").convert("RGB")), 1)
    fg = lab == 2
    assert (panel[fg] != imgs[0][fg]).any(axis=-1).all() and (panel[lab == 0] == imgs[0][lab == 0]).all()
    assert (panel[lab == 255] != imgs[0][lab == 255]).any(axis=-1).all()      # ignore shown (white tint)
    n_img, n_data = _html_images((out / "index.html").read_text())
    assert n_img == n_data == 3 * 2


@pytest.fixture(scope="module")
def testbeds(tmp_path_factory):
    from labelwise.data.synth import generate

    root = tmp_path_factory.mktemp("testbeds")
    return {k: generate(k, root / k, n_train=1, n_val=2, size=64) for k in ("objects", "parts")}


def test_results_with_coco_gt(testbeds, tmp_path, capsys):
    from labelwise.data import build_dataset

    root = testbeds["objects"]
    ds = build_dataset(f"coco:{root}", "val")
    recs = [_rec(a["mask"], 0.9 - 0.05 * k, file_name=ds.file_name(i), level="instance")
            for i in range(len(ds)) for k, a in enumerate(ds.load_instances(i))]
    pred = tmp_path / "res.json"
    pred.write_text(json.dumps(recs))
    out = tmp_path / "show"
    rc, _, err = _run(["show", str(pred), "--images", str(root / "images" / "val"), "--out", str(out),
                       "--gt", f"coco:{root}", "--split", "val"], capsys)
    assert rc == 0, err
    assert "match no image" not in err
    html = (out / "index.html").read_text()
    n_img, n_data = _html_images(html)
    assert n_img == n_data == len(ds) * 3 and "GT instances" in html      # image, prediction, ground truth
    item = ds[0]
    row = np.asarray(Image.open(out / (Path(ds.file_name(0)).stem + ".png")).convert("RGB"))
    gt_panel = _panel(row, 2)
    m = np.asarray(item["instances"][0]["mask"], dtype=bool)
    assert (gt_panel[m] != item["image"][m]).any(axis=-1).all()
    none = ~np.any([a["mask"] for a in item["instances"]], axis=0)
    assert (gt_panel[none] != item["image"][none]).any(axis=-1).mean() < 0.2  # only number boxes outside


def test_parts_folder_with_parts_gt(testbeds, tmp_path, capsys):
    root = testbeds["parts"]
    pred = tmp_path / "pred"
    for level in ("parts", "objects"):
        shutil.copytree(root / level / "val", pred / level)
    assert detect_pred_kind(pred) == "parts"
    out = tmp_path / "show"
    rc, _, err = _run(["show", str(pred), "--images", str(root / "images" / "val"), "--out", str(out),
                       "--gt", f"parts:{root}"], capsys)
    assert rc == 0, err
    html = (out / "index.html").read_text()
    n_img, n_data = _html_images(html)
    assert n_img == n_data == 2 * 5                                           # image, parts, objects, GT x2
    stem = sorted(p.stem for p in (root / "images" / "val").iterdir())[0]
    row = np.asarray(Image.open(out / f"{stem}.png").convert("RGB"))
    assert (_panel(row, 1) == _panel(row, 3)).all() and (_panel(row, 2) == _panel(row, 4)).all()
    img = read_image(next((root / "images" / "val").glob(stem + ".*")))
    assert (_panel(row, 1) != img).any()


# --------------------------------------------------------------------------- errors and help


@pytest.mark.parametrize("what", ["missing", "txt", "empty_dir", "bad_json"])
def test_bad_pred_is_one_line(tmp_path, capsys, what):
    _images(tmp_path / "imgs")
    pred = {"missing": tmp_path / "nope.json", "txt": tmp_path / "x.txt", "empty_dir": tmp_path / "d",
            "bad_json": tmp_path / "bad.json"}[what]
    if what == "txt":
        pred.write_text("hello")
    elif what == "empty_dir":
        pred.mkdir()
    elif what == "bad_json":
        pred.write_text(json.dumps({"not": "results"}))
    rc, _, err = _run(["show", str(pred), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")], capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labelwise: error:") and str(pred) in lines[0]


def test_bad_images_and_split_without_gt(tmp_path, capsys):
    pred = tmp_path / "r.json"
    pred.write_text("[]")
    rc, _, err = _run(["show", str(pred), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--images" in err
    _images(tmp_path / "imgs")
    rc, _, err = _run(["show", str(pred), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"),
                       "--split", "val"], capsys)
    assert rc == 2 and "--gt" in err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["show", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and "--images" in text and "--gt" in text and "--no-progress" in text


def test_compose_row_layout():
    a = np.zeros((H, W, 3), dtype=np.uint8)
    from labelwise.report.show import Panel

    row = compose_row([Panel("image", a), Panel("a very long title that does not fit", a + 7)])
    assert row.shape == (TITLE + H, 2 * W + GAP, 3)
    assert (_panel(row, 1) == 7).all()
