"""Report building blocks: colormap, overlays, label colours, SVG plot, self-contained HTML."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from labelwise.io import VOC_PALETTE
from labelwise.report import (Section, colorize_label, heatmap, html_table, img_html, jet, label_overlay,
                              nice_ticks, overlay, png_data_uri, svg_line_plot, write_report)


def test_jet_known_points():
    out = jet(np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert out.dtype == np.uint8 and out.shape == (5, 3)
    np.testing.assert_array_equal(out, [[0, 0, 128], [0, 128, 255], [128, 255, 128], [255, 128, 0], [128, 0, 0]])
    # clipping and NaN handling
    np.testing.assert_array_equal(jet(np.array([-3.0, 7.0, np.nan])), [[0, 0, 128], [128, 0, 0], [0, 0, 128]])
    # monotone hue walk: blue dominates low values, red dominates high values
    x = jet(np.linspace(0, 1, 101))
    assert (x[:30, 2] >= x[:30, 0]).all() and (x[-30:, 0] >= x[-30:, 2]).all()
    assert jet(np.zeros((4, 5))).shape == (4, 5, 3)


def test_overlay_alpha_blending():
    img = np.full((2, 3, 3), 100, np.uint8)
    col = np.full((2, 3, 3), 200, np.uint8)
    np.testing.assert_array_equal(overlay(img, col, alpha=0.25), np.full((2, 3, 3), 125))
    np.testing.assert_array_equal(overlay(img, col, alpha=0.0), img)
    np.testing.assert_array_equal(overlay(img, col, alpha=1.0), col)
    # a single colour and a where-mask
    where = np.array([[True, False, False], [False, False, True]])
    out = overlay(img, (0, 0, 255), alpha=0.5, where=where)
    np.testing.assert_array_equal(out[0, 0], [50, 50, 178])
    np.testing.assert_array_equal(out[0, 1], [100, 100, 100])
    np.testing.assert_array_equal(out[1, 2], [50, 50, 178])
    with pytest.raises(ValueError):
        overlay(img, col, alpha=1.5)


def test_colorize_label_and_label_overlay():
    lab = np.array([[0, 1, 2], [15, 255, 3]], np.uint8)
    rgb = colorize_label(lab)
    np.testing.assert_array_equal(rgb[0, 1], [128, 0, 0])  # VOC aeroplane
    np.testing.assert_array_equal(rgb[0, 2], [0, 128, 0])
    np.testing.assert_array_equal(rgb[1, 0], VOC_PALETTE[15])
    np.testing.assert_array_equal(rgb[1, 1], [255, 255, 255])  # ignore -> white
    np.testing.assert_array_equal(colorize_label(lab, ignore_color=None)[1, 1], VOC_PALETTE[255])
    img = np.full((2, 3, 3), 40, np.uint8)
    ov = label_overlay(img, lab, alpha=0.5)
    np.testing.assert_array_equal(ov[0, 0], [40, 40, 40])  # background untouched
    np.testing.assert_array_equal(ov[0, 1], [84, 20, 20])


def test_heatmap_normalises_and_resizes():
    cam = np.zeros((4, 4))
    cam[0, 0] = 5.0
    hm = heatmap(cam)
    np.testing.assert_array_equal(hm[0, 0], [128, 0, 0])
    np.testing.assert_array_equal(hm[3, 3], [0, 0, 128])
    img = np.zeros((8, 8, 3), np.uint8)
    assert heatmap(cam, img, alpha=0.5).shape == (8, 8, 3)
    assert (heatmap(np.ones((3, 3))) == [0, 0, 128]).all()  # constant map -> lowest colour


def test_png_data_uri_round_trip():
    arr = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    uri = png_data_uri(arr)
    assert uri.startswith("data:image/png;base64,")
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(back, arr)


def test_svg_polyline_points():
    xs = list(range(0, 50, 5))
    svg = svg_line_plot({"loss": (xs, [1.0 / (1 + x) for x in xs]), "lr": ([0, 10, 20], [1, float("nan"), 3])},
                        title="Training <loss>", xlabel="step")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    polys = re.findall(r'<polyline[^>]*points="([^"]*)"', svg)
    assert len(polys) == 2
    assert len(polys[0].split()) == 10
    assert len(polys[1].split()) == 2  # NaN dropped
    assert "Training &lt;loss&gt;" in svg
    # first point is left of the last, and higher loss -> smaller y (SVG y grows down)
    (x0, y0), (x1, y1) = (tuple(map(float, p.split(","))) for p in (polys[0].split()[0], polys[0].split()[-1]))
    assert x0 < x1 and y0 < y1
    assert "no data" in svg_line_plot({"a": ([], [])})
    assert len(re.findall("<polyline", svg_line_plot({"a": ([1, 2, 3], [1, 10, 100])}, log_y=True))) == 1


def test_nice_ticks():
    assert nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    t = nice_ticks(3.2, 97.0, 5)
    assert t[0] >= 3.2 and t[-1] <= 97.0 and len(t) >= 4


def test_html_table_escapes_and_formats():
    html = html_table(["class", "IoU"], [["<cat>", 0.12345], ["dog", float("nan")], ["n", 3]], caption="t")
    assert "&lt;cat&gt;" in html and "<cat>" not in html
    assert "0.123" in html and "&ndash;" in html and "<td>3</td>" in html
    assert html.count("<tr>") == 4


def test_write_report_self_contained(tmp_path):
    img = np.zeros((6, 6, 3), np.uint8)
    sections = [Section("Examples", img_html(img, "an image")),
                ("Loss", svg_line_plot({"loss": ([0, 1, 2], [3, 2, 1])})),
                Section("Table", html_table(["a"], [[1.0]]))]
    path = write_report(tmp_path / "sub" / "report.html", sections, title="T & T")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "</html>" in text
    assert "T &amp; T" in text
    for title in ("Examples", "Loss", "Table"):
        assert f">{title}</h2>" in text
    assert "data:image/png;base64," in text and "<polyline" in text
    # nothing external: no http(s) src/href, no external stylesheet/script
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', text, re.I)
    assert not re.search(r"<(script|link)\b", text, re.I)
    assert not list((tmp_path / "sub").glob(".*.tmp"))  # atomic write leaves no temp file
