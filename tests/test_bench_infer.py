"""``labelwise bench infer`` writes the contract JSON: one entry per variant with ms_per_image,
and the engine's one-pass vs two-pass ratio measured in the same run (no time is asserted)."""

import json

import torch

from labelwise.cli import main


def test_bench_infer_tiny_run_writes_contract_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "infer", "--images", "2", "--size", "48", "--repeats", "1", "--batch-size", "2",
                     "--threads", str(threads), "--device", "cpu", "--json", str(tmp_path / "b.json"),
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res) == {"cam_single", "cam_multiscale", "cam_multiscale_batched", "infer_two_passes",
                        "infer_one_pass"}
    for v in res.values():
        assert v["ms_per_image"] > 0 and v["ms_per_image_min"] <= v["ms_per_image"] <= v["ms_per_image_max"]
    r = res["infer_one_pass"]
    assert r["speedup_vs_two_passes"] == res["infer_two_passes"]["ms_per_image"] / r["ms_per_image"]
    assert "infer_one_pass" in capsys.readouterr().out


def test_bench_seco_tiny_run_writes_contract_json(tmp_path, capsys):
    assert main(["bench", "seco", "--images", "8", "--size", "48", "--steps", "1", "--warmup", "1", "--threads", "1",
                 "--device", "cpu", "--json", str(tmp_path / "s.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert set(res) == {"seco", "seco_baseline", "cam"}
    for v in res.values():
        assert v["ms_per_step"] > 0 and v["peak_rss_mb"] > 0 and v["steps"] == 1
    assert res["seco"]["ratio_vs_cam"] == res["seco"]["ms_per_step"] / res["cam"]["ms_per_step"]


def test_bench_seco_bad_flags_are_one_line_errors(tmp_path, capsys):
    for argv, word in ((["--steps", "0"], "--steps"), (["--images", "4"], "--images"), (["--size", "8"], "--size")):
        assert main(["bench", "seco", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1, err


def test_bench_cobra_tiny_run_times_training_and_inference_stages(tmp_path, capsys):
    assert main(["bench", "cobra", "--only", "cobra,cam,infer_irn", "--images", "8", "--infer-images", "2",
                 "--size", "48", "--steps", "1", "--warmup", "1", "--repeats", "1", "--threads", "1", "--device", "cpu",
                 "--json", str(tmp_path / "c.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert set(res) == {"cobra", "cam", "infer_irn"}
    assert res["cobra"]["kind"] == "train" and res["cobra"]["ms_per_step"] > 0 and res["cobra"]["steps"] == 1
    assert res["cobra"]["ratio_vs_cam"] == res["cobra"]["ms_per_step"] / res["cam"]["ms_per_step"]
    assert res["infer_irn"]["kind"] == "infer" and res["infer_irn"]["ms_per_image"] > 0
    assert res["infer_irn"]["peak_rss_mb"] > 0 and "ratio_vs_cam" not in res["infer_irn"]  # no infer_cam measured


def test_bench_cobra_bad_flags_are_one_line_errors(tmp_path, capsys):
    for argv, word in ((["--steps", "0"], "--steps"), (["--images", "4"], "--images"),
                       (["--infer-images", "40"], "--infer-images"), (["--only", "nope"], "--only")):
        assert main(["bench", "cobra", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1, err


def test_bench_oap_train_tiny_run_reports_the_share_of_the_step_in_oap(tmp_path, capsys):
    assert main(["bench", "oap-train", "--images", "4", "--size", "64", "--steps", "1", "--warmup", "1",
                 "--threads", "1", "--device", "cpu", "--json", str(tmp_path / "o.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert set(res) == {"oap", "cam"}
    for v in res.values():
        assert v["ms_per_step"] > 0 and v["peak_rss_mb"] > 0 and v["steps"] == 1
    o = res["oap"]
    assert 0 < o["oap_share"] < o["teacher_share"] < 1 and o["oap_ms_per_step"] < o["teacher_ms_per_step"]
    assert o["ratio_vs_cam"] == o["ms_per_step"] / res["cam"]["ms_per_step"]
    assert main(["bench", "oap-train", "--steps", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and len(err.strip().splitlines()) == 1, err


def test_bench_cocal_tiny_run_writes_contract_json(tmp_path, capsys):
    assert main(["bench", "cocal", "--images", "8", "--size", "64", "--steps", "1", "--warmup", "0", "--threads", "1",
                 "--device", "cpu", "--mask2former", "--json", str(tmp_path / "c.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert set(res) == {"cocal", "kmax", "cam", "cocal_mask2former", "mask2former"}
    for v in res.values():
        assert v["ms_per_step"] > 0 and v["peak_rss_mb"] > 0 and v["steps"] == 1
    assert res["cocal"]["ratio_vs_kmax"] == res["cocal"]["ms_per_step"] / res["kmax"]["ms_per_step"]
    assert (res["cocal_mask2former"]["ratio_vs_mask2former"]
            == res["cocal_mask2former"]["ms_per_step"] / res["mask2former"]["ms_per_step"])
    for argv, word in ((["--steps", "0"], "--steps"), (["--images", "4"], "--images")):
        assert main(["bench", "cocal", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1, err
