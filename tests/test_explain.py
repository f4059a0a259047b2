"""``labelwise explain``: a CoCal run's dictionary components, chosen paths and part <-> object
component similarities for one image (tiny runs trained here, CPU)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from labelwise.cli import main

TINY = ["model.pretrained=false", "data.crop_size=64", "train.batch_size=2", "train.eval_at_end=false",
        "loss.instdisc_samples=64"]
EXTERNAL_URL = re.compile(r'(src|href)\s*=\s*["\']?(https?:)?//', re.I)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models here run ~10x faster on one thread than on two when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    from labelwise.data.synth import generate, testbed_spec

    root = generate("parts", tmp_path_factory.mktemp("parts") / "tb", n_train=4, n_val=1, size=64, seed=0)
    return testbed_spec("parts", root), root / "images" / "val" / "val_000000.jpg"


@pytest.fixture(scope="module")
def cocal_run(testbed, tmp_path_factory):
    from labelwise.engine import api

    return api.train("cocal", testbed[0], tmp_path_factory.mktemp("runs") / "cocal", preset="cpu", overrides=TINY,
                     steps=2, show_progress=False)


@pytest.fixture(scope="module")
def explained(cocal_run, testbed, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "out"
    assert main(["explain", str(cocal_run), "--image", str(testbed[1]), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    return out, json.loads((out / "explain.json").read_text())


def test_explain_writes_the_files(explained):
    out, js = explained
    for f in ("index.html", "explain.json", "paths.png", "path_probability.png", "parts_components.png",
              "objects_components.png", "similarity_matrix.png", "labels/parts.png", "labels/objects.png"):
        assert (out / f).is_file(), f
    P, O = len(js["part_names"]), len(js["object_names"])
    comps = sorted(p.name for p in (out / "components").glob("*.png"))
    assert len(comps) == P + O == len(js["files"]["components"])
    assert "part_00_background.png" in comps and f"object_{O - 1:02d}_{js['object_names'][-1]}.png" in comps
    html = (out / "index.html").read_text()
    assert not EXTERNAL_URL.search(html)           # self-contained
    for name in js["part_names"] + js["object_names"]:
        assert name in html
    for r in js["paths"]:                          # the path legend and the matrix table
        assert f"{r['part_name']} &rarr; " in html
    assert html.count("<tr><td>") >= P


def test_matrix_is_the_cosine_of_the_models_components(explained, cocal_run, testbed):
    from labelwise.engine.api import load_run
    from labelwise.io import read_image

    _, js = explained
    run = load_run(cocal_run, "cpu")
    P = run.model.num_parts
    x = run.method.inference_transform(run.cfg, run.info)({"image": read_image(testbed[1])})["input"][None]
    with torch.no_grad():
        c = run.model(x)["cluster_centres"][0].double()
    direct = (c[:P] @ c[P:].T) / (c[:P].norm(dim=1)[:, None] * c[P:].norm(dim=1)[None, :])
    got = np.array(js["similarity_matrix"])
    assert got.shape == (P, run.model.num_objects)
    np.testing.assert_allclose(got, direct.numpy(), atol=1e-5)
    assert js["parent_is_nearest"] == [int(np.argmax(got[p])) == js["part_to_object"][p] for p in range(P)]


def test_similarity_maps_are_pixel_component_cosines(cocal_run, testbed):
    import torch.nn.functional as F

    from labelwise.engine.api import load_run
    from labelwise.io import read_image
    from labelwise.report.explain import compute_explanation

    run = load_run(cocal_run, "cpu")
    img = read_image(testbed[1])
    ex = compute_explanation(run, img, max_side=64)  # 64 px image: drawn at MIN_DISPLAY
    x = run.method.inference_transform(run.cfg, run.info)({"image": img})["input"][None]
    with torch.no_grad():
        out = run.model(x)
    pix, cen = out["pixel_feature"][0], F.normalize(out["cluster_centres"][0], dim=-1)
    low = torch.einsum("dhw,qd->qhw", pix, cen)
    assert low.abs().max() <= 1.0 + 1e-5
    up = F.interpolate(low[None], size=ex.display.shape[:2], mode="bilinear", align_corners=False)[0].numpy()
    P = run.model.num_parts
    np.testing.assert_allclose(ex.part_similarity, up[:P], atol=1e-5)
    np.testing.assert_allclose(ex.object_similarity, up[P:], atol=1e-5)


def test_part_and_object_maps_follow_the_hierarchy(explained, testbed):
    from labelwise.io import read_image, read_label

    out, js = explained
    parts, objects = read_label(out / "labels/parts.png"), read_label(out / "labels/objects.png")
    assert parts.shape == objects.shape == read_image(testbed[1]).shape[:2] == tuple(js["image_size"])
    p2o = np.array(js["part_to_object"])
    np.testing.assert_array_equal(objects, p2o[parts])
    counts = np.bincount(parts.reshape(-1), minlength=len(p2o))
    assert {r["part"]: r["pixels"] for r in js["paths"]} == {int(p): int(counts[p]) for p in np.flatnonzero(counts)}
    assert all(r["object"] == p2o[r["part"]] and r["object_name"] == js["object_names"][r["object"]]
               for r in js["paths"])
    assert sum(r["pixels"] for r in js["paths"]) == parts.size


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("labelwise: error:"), err
    return err


def test_kmax_run_is_refused(testbed, tmp_path, capsys):
    from labelwise.engine import api

    run = api.train("kmax", testbed[0], tmp_path / "kmax", preset="cpu", overrides=TINY, steps=1,
                    show_progress=False)
    capsys.readouterr()
    assert main(["explain", str(run), "--image", str(testbed[1]), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "'kmax' run" in err and "labelwise train cocal" in err and "cocal.dictionary=true" in err
    assert not (tmp_path / "o").exists()


def test_dictionary_off_missing_image_and_not_a_run_are_refused(cocal_run, testbed, tmp_path, capsys):
    off = tmp_path / "off"
    shutil.copytree(cocal_run, off)
    text = (off / "config.yaml").read_text()
    for key in ("dictionary", "p_con", "o_con", "logic_loss", "path_inference"):
        text, n = re.subn(rf"(\n  {key}:) true", r"\1 false", text)
        assert n == 1, key
    (off / "config.yaml").write_text(text)
    img = str(testbed[1])
    assert main(["explain", str(off), "--image", img, "--out", str(tmp_path / "o")]) == 2
    assert "cocal.dictionary is false" in _one_line_error(capsys)
    assert main(["explain", str(cocal_run), "--image", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert "--image" in _one_line_error(capsys)
    assert main(["explain", str(tmp_path), "--image", img, "--out", str(tmp_path / "o")]) == 2
    assert "no run.json" in _one_line_error(capsys)


def test_demo_help_lists_with_cocal(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "--with-cocal" in text and "--cocal-steps" in text
