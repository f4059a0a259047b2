"""`labelwise bench oap`: a tiny end-to-end run (JSON contract, ratios, node counts, oracle bound,
markdown) and the pieces of the protocol (thread pinning, token-grid snapping, ground-truth features)."""

import json

import numpy as np
import pytest
import torch

from labelwise.benchmarks import oap as bench
from labelwise.cli import main
from labelwise.cli.bench import format_table

SPEED = ("oap", "maskcut", "maskcut_lanczos", "tokencut", "tokencut_lanczos")


def test_bench_oap_tiny_run_writes_contract_json(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["bench", "oap", "--val", "2", "--train", "1", "--size", "64", "--grids", "6,8",
               "--quality-grids", "6,8", "--gt-grid", "8", "--speed-images", "2", "--passes", "1",
               "--threads", "1", "--photos", "astronaut,chelsea", "--set", "oap.score=persistence",
               "--no-progress", "--json", str(out), "--md", str(md)])
    assert rc == 0
    res = json.loads(out.read_text())
    for name in SPEED:                                                  # speed contract
        r = res[name]
        assert r["ms_per_image"] == r["ms_per_image_8_t1"] > 0
        for c in ("", "rough_"):
            for g in (6, 8):
                assert r[f"ms_per_image_{c}{g}_t1"] > 0                 # the requested thread count only
                assert f"ms_per_image_{c}{g}_t2" not in r
                t = r["timing"][f"{c or 'smooth_'}{g}_t1"]
                assert t["min_ms"] <= t["median_ms"] == r[f"ms_per_image_{c}{g}_t1"] <= t["max_ms"]
                assert t["calls"] == 2 and t["threads"] == 1 and t["passes"] == 1
                assert t["cpu_per_wall"] < 1.5                          # pinned to one thread
                if name != "oap":
                    ratio = r[f"ms_per_image_{c}{g}_t1"] / res["oap"][f"ms_per_image_{c}{g}_t1"]
                    assert r[f"x_oap_{c}{g}_t1"] == pytest.approx(ratio, rel=1e-12)
    from labelwise.blocks.crf import crf_available

    e2e_rows = list(SPEED) + (["maskcut_crf"] if crf_available() else [])     # end to end
    for name in e2e_rows:
        r = res[name]
        for g in (6, 8):
            e = r["e2e"][f"{g}_t1"]
            assert r[f"e2e_ms_per_image_{g}_t1"] == e["median_ms"] > 0
            assert e["min_ms"] <= e["median_ms"] <= e["max_ms"]
            assert set(e["parts_ms"]) == set(e["parts"]) == {"decode", "features", "generator", "post"}
            assert sum(e["parts_ms"].values()) == pytest.approx(e["median_ms"], rel=1e-9)   # parts add up
            for p in e["parts"].values():
                assert 0 <= p["min_ms"] <= p["median_ms"] <= p["max_ms"]
            assert e["calls"] == 2 and e["threads"] == 1 and e["passes"] == 1 and e["images"] == 2
            assert e["input_px"] == 32 * g and e["cpu_per_wall"] < 1.5
            if name == "oap":
                assert f"x_oap_e2e_{g}_t1" not in r
            else:                                                       # this run's own numbers
                assert r[f"x_oap_e2e_{g}_t1"] == pytest.approx(
                    r[f"e2e_ms_per_image_{g}_t1"] / res["oap"][f"e2e_ms_per_image_{g}_t1"], rel=1e-12)
    if crf_available():                                                 # one cut, two post-processings
        a, b = res["maskcut"]["e2e"]["8_t1"], res["maskcut_crf"]["e2e"]["8_t1"]
        for p in ("decode", "features", "generator"):
            assert a["parts"][p] == b["parts"][p]
    assert res["protocol"]["settings"]["e2e"] is True
    tg = res["targets"]["speed_8_t1"]
    assert tg["maskcut_over_oap"] == pytest.approx(res["maskcut"]["x_oap_8_t1"]) and tg["target"] == 30.0

    nodes = res["oap"]["nodes"]                                         # supernodes per layer
    assert set(nodes) == {f"{c}_{g}" for c in ("smooth", "rough", "photo") for g in (6, 8)}
    for tag, n in nodes.items():
        g = int(tag.split("_")[1])
        assert n["tokens"] == g * g and len(n["instance_nodes"]) == 5 and len(n["semantic_nodes"]) == 5
        assert all(a >= b for a, b in zip(n["instance_nodes"], n["instance_nodes"][1:]))
        assert n["instance_nodes"][0] <= g * g
        assert len(n["instance_nodes_per_image"]) == 2                  # 2 speed images, 2 photos
    assert nodes["rough_8"]["instance_nodes"][0] >= nodes["smooth_8"]["instance_nodes"][0]

    rows = [k for k in res if any(x.startswith("ap50_") for x in res[k])]   # quality
    assert {"oap", "maskcut", "tokencut", "oracle", "oap_gtfeat", "maskcut_gtfeat", "tokencut_gtfeat"} <= set(rows)
    for g in (6, 8):
        for k in rows:
            if f"ap50_{g}" in res[k]:
                assert 0.0 <= res[k][f"ap50_{g}"] <= res["oracle"][f"ap50_{g}"] + 1e-9, (k, g)
    assert res["oracle"]["ap50_8"] > 0

    prot = res["protocol"]["settings"]
    assert prot["overrides"] == ["oap.score=persistence"] and prot["threads"] == [1]
    assert prot["phi_tokens"] == {"6": 1, "8": 1} and prot["stride"] == 32
    text = md.read_text()
    assert "| **OAP** |" in text and "x OAP 8² · 1 thr" in text and "oracle" in text and "layer 4" in text
    assert "End to end, ms per image: decode + features + generator + masks/RLE" in text
    assert "| **OAP** | 8² (256 px) · 1 thr |" in text
    table = capsys.readouterr().out
    assert "maskcut_lanczos" in table and "ms_per_image" in table.splitlines()[0]


def test_no_e2e_skips_the_end_to_end_rows(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "oap", "--val", "1", "--train", "1", "--size", "64", "--grids", "6", "--no-quality",
                 "--speed-images", "1", "--passes", "1", "--threads", "1", "--photos", "", "--content", "smooth",
                 "--no-e2e", "--no-progress", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["oap"]["ms_per_image_6_t1"] > 0 and res["protocol"]["settings"]["e2e"] is False
    assert not any(k.startswith(("e2e", "x_oap_e2e")) for r in res.values() for k in r)


def test_e2e_summary_parts_of_the_median_call_add_up():
    calls = [{"decode": d, "features": 0.010, "generator": g, "post": 0.001, "masks": m}
             for d, g, m in ((0.001, 0.004, 2), (0.003, 0.001, 4), (0.002, 0.009, 3), (0.001, 0.002, 5))]
    s = bench._e2e_summary(calls, cpu=[1.0, 1.0], wall=[1.0, 2.0], threads=1, images=2, passes=2)
    # totals (ms) 16, 15, 22, 14: median 15.5 = mean of the calls totalling 15 and 16
    assert s["median_ms"] == pytest.approx(15.5)
    assert s["min_ms"] == pytest.approx(14) and s["max_ms"] == pytest.approx(22)
    assert s["parts_ms"]["decode"] == pytest.approx(2.0) and s["parts_ms"]["generator"] == pytest.approx(2.5)
    assert sum(s["parts_ms"].values()) == pytest.approx(s["median_ms"])
    assert s["parts"]["generator"] == {"median_ms": pytest.approx(3.0), "min_ms": pytest.approx(1.0),
                                       "max_ms": pytest.approx(9.0)}
    assert s["masks_per_image"] == 3.5 and s["cpu_per_wall"] == pytest.approx(2 / 3) and s["calls"] == 4
    odd = bench._e2e_summary(calls[:3], [1.0], [1.0], 1, 3, 1)      # totals 16, 15, 22: the 16 ms call
    assert odd["median_ms"] == pytest.approx(16) and odd["parts_ms"]["generator"] == pytest.approx(4.0)


@pytest.mark.parametrize("method", ["oap", "maskcut"])
def test_e2e_call_writes_what_pseudo_masks_writes(tmp_path, monkeypatch, method):
    """The timed end-to-end call is the command's per-image path: its records are the ones
    ``labelwise pseudo-masks`` writes for the same image, backbone, grid and settings."""
    import warnings

    from labelwise.data.synth import generate
    from labelwise.pseudo import runner
    from labelwise.pseudo.common import FeatureExtractor, build_method, resolve_pseudo_config

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    root = generate("objects", tmp_path / "o", n_train=1, n_val=2, size=64, seed=0)
    images = root / "images" / "val"
    fe = FeatureExtractor("efficientnet_lite0", None, 256, "cpu", 8)
    sets = ["features.num_workers=0"]
    out = tmp_path / f"{method}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                 # maskcut without pydensecrf2
        runner.generate(method, images, out, overrides=sets, extractor=fe, backbone="efficientnet_lite0",
                        resolution=256, grid=8, batch_size=1, show_progress=False)
        cfg = resolve_pseudo_config(method, sets, {"features": {"backbone": "efficientnet_lite0"}})
        fn = build_method(method, cfg)

    class Keep:
        def __init__(self):
            self.rows = {}

        def write(self, item, recs):
            self.rows[item["file_name"]] = recs

    keep = Keep()
    cli = json.loads(out.read_text())
    names = sorted({r["file_name"] for r in cli})
    assert names
    for name in names:
        t = bench.e2e_call(images / name, name, fe, fn, tuple(cfg.levels),
                           {"row": getattr(fn.impl, "postprocess", None)}, {"row": keep})
        assert set(t["row"]) == {"decode", "features", "generator", "post", "masks"}
        mine = [{k: v for k, v in r.items() if k != "embedding"} for r in keep.rows[name]]
        theirs = [{k: v for k, v in r.items() if k not in ("id", "image_id", "file_name")}
                  for r in cli if r["file_name"] == name]
        assert t["row"]["masks"] == len(mine) and mine == theirs


def test_cuda_device_without_gpu_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = main(["bench", "oap", "--device", "cuda", "--no-progress", "--json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no CUDA device" in err[0]


def test_pinned_threads_limits_torch_and_blas():
    import scipy.linalg  # noqa: F401 - loads the BLAS scipy uses
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    assert blas(), "no BLAS visible to threadpoolctl"
    with threadpool_limits(limits=2):
        torch.set_num_threads(2)
        with bench.pinned_threads(1):
            assert set(blas()) == {1} and torch.get_num_threads() == 1
        assert set(blas()) == {2} and torch.get_num_threads() == 2    # restored
    with threadpool_limits(limits=1):
        torch.set_num_threads(1)
        with bench.pinned_threads(2):
            assert set(blas()) == {2} and torch.get_num_threads() == 2
        assert set(blas()) == {1} and torch.get_num_threads() == 1


def test_parse_threads():
    cores = bench.num_cores()
    assert bench.parse_threads("1,all") == ([1] if cores == 1 else [1, cores])
    assert bench.parse_threads("2, 1,2") == [2, 1]
    with pytest.raises(ValueError):
        bench.parse_threads("0")


def test_snap_masks_majority_of_each_token_cell():
    m = np.zeros((2, 16, 16), bool)                  # 4x4 grid of 4x4-pixel cells
    m[0, 0:4, 0:4] = True                            # one whole cell
    m[0, 4:8, 0:3] = True                            # 12/16 of a cell -> in
    m[0, 8:12, 0:2] = True                           # 8/16 of a cell -> out (not > 0.5)
    m[1, 0:1, :] = True                              # a thin band: no token at all
    s = bench.snap_masks(m, 4)
    assert s.dtype == torch.bool and s.shape == (2, 4, 4)
    assert s[0].nonzero().tolist() == [[0, 0], [1, 0]]
    assert not s[1].any()
    assert bench.snap_masks(np.zeros((0, 16, 16), bool), 4).shape == (0, 4, 4)
    from labelwise.pseudo.common import upsample_masks

    aligned = np.zeros((1, 16, 16), bool)
    aligned[0, 4:12, :] = True                       # a band on cell boundaries: snap + upsample give it back
    assert (upsample_masks(bench.snap_masks(aligned, 4), (16, 16)) == aligned).all()
    aligned[0, :, :8] = False                        # a box: only its convex corners are rounded off (bilinear)
    back = upsample_masks(bench.snap_masks(aligned, 4), (16, 16))
    assert (back <= aligned).all() and (aligned & ~back).sum() == 2


def test_ground_truth_features_one_prototype_per_region():
    ids = np.zeros((16, 16), np.int64)
    ids[:, 8:] = 7                                   # two stuff halves
    ids[0:4, 0:4] = 3                                # a thing on one cell
    ids[4:8, 4:7] = 5                                # 12 of 16 pixels of cell (1, 1)
    tok = bench.token_majority(ids, 4)
    assert tok.tolist() == [[3, 0, 7, 7], [0, 5, 7, 7], [0, 0, 7, 7], [0, 0, 7, 7]]
    g = torch.Generator().manual_seed(0)
    f = bench.gt_features(tok, 64, 0.0, g)
    assert f.shape == (4, 4, 64)
    flat, lab = f.reshape(-1, 64), tok.reshape(-1)
    assert len(torch.unique(flat, dim=0)) == len(torch.unique(lab)) == 4   # one prototype per region
    for r in torch.unique(lab):
        rows = flat[lab == r]
        assert torch.allclose(rows, rows[:1].expand_as(rows))
    assert torch.allclose(flat.norm(dim=-1), torch.ones(16))
    noisy = bench.gt_features(tok, 64, 0.5, torch.Generator().manual_seed(0))   # same prototypes, + noise
    dev = (noisy - f).norm(dim=-1)
    assert 0.35 < float(dev.mean()) < 0.65           # noise norm about --gt-noise


def test_rough_noise_is_relative_to_the_centred_features():
    g = torch.Generator().manual_seed(0)
    keys = 3.0 + 0.2 * torch.randn(2, 8, 8, 32, generator=g)
    noisy = bench.add_noise(keys, 1.0, torch.Generator().manual_seed(1))
    noise_rms = float((noisy - keys).pow(2).mean().sqrt())
    assert noise_rms == pytest.approx(0.2, rel=0.1)


def test_format_table_columns():
    t = format_table({"a": {"x": 1, "ms_per_image": 2.5}, "b": {"ms_per_image": 1.0, "y": "z"}})
    head, _, a, b = t.splitlines()
    assert head.split() == ["variant", "ms_per_image", "x", "y"]
    assert a.split() == ["a", "2.5", "1", "-"] and b.split() == ["b", "1", "-", "z"]


def test_gpu_timing_path_with_cuda_calls_stubbed(monkeypatch):
    """``oap_gpu``'s timing loop (run on the CPU here, CUDA calls stubbed): batch, per-image figures, nodes."""
    from argparse import Namespace

    from labelwise.pseudo.oap.pooling import OnlineAgglomerativePooling

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stub")
    keys = torch.randn(3, 6, 6, 16, generator=torch.Generator().manual_seed(0))
    args = Namespace(gpu_batch=4, passes=2, rough_noise=1.0)
    out = bench._gpu_oap(args, keys, OnlineAgglomerativePooling(), torch.device("cpu"), torch.Generator())
    assert out["batch"] == 4 and out["grid"] == 6 and out["distinct_images"] == 3
    for case in ("", "_rough"):
        assert out[f"ms_per_image{case}_min"] <= out[f"ms_per_image{case}"] <= out[f"ms_per_image{case}_max"]
    assert out["nodes"]["smooth_6"]["tokens"] == 36 and len(out["nodes"]["rough_6"]["instance_nodes"]) == 5
    assert len(synced) >= 2 * (1 + 2 * 2)            # around the warm-up and every timed call


def test_bench_fit_to_targets_scores_a_model_against_its_pseudo_masks(tmp_path):
    """``bench/oap_fit_to_targets.py``: masks scored against themselves as the ground truth reach AP50
    1; with half of the targets missing from the predictions AR100 falls to about a half; semantic
    records are not targets."""
    import json
    import os
    import runpy

    from labelwise.data.synth import generate

    root = generate("objects", tmp_path / "o", n_train=1, n_val=3, size=64, seed=0)
    gt = json.loads((root / "annotations" / "instances_val.json").read_text())
    names = {im["id"]: im["file_name"] for im in gt["images"]}
    rows = [{"image_id": a["image_id"], "file_name": names[a["image_id"]], "category_id": 1,
             "segmentation": a["segmentation"], "score": 0.9, "level": "instance"} for a in gt["annotations"]]
    semantic = [{**rows[0], "level": "semantic"}]
    (tmp_path / "pseudo.json").write_text(json.dumps(rows + semantic))
    (tmp_path / "all.json").write_text(json.dumps(rows))
    (tmp_path / "half.json").write_text(json.dumps(rows[::2]))
    mod = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "bench", "oap_fit_to_targets.py"))
    full = mod["score_against_pseudo_masks"](root, tmp_path / "pseudo.json", tmp_path / "all.json")
    assert full["ap50"] == pytest.approx(1.0) and full["targets_per_image"] == pytest.approx(len(rows) / 3)
    half = mod["score_against_pseudo_masks"](root, tmp_path / "pseudo.json", tmp_path / "half.json")
    assert half["ar100"] == pytest.approx(len(rows[::2]) / len(rows), abs=0.02)
