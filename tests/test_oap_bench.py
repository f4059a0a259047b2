"""`labelwise bench oap` plumbing on a tiny run (small grids, two images)."""

import json

from labelwise.cli import main
from labelwise.cli.bench import format_table


def test_bench_oap_tiny_run_writes_contract_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "oap", "--val", "2", "--size", "64", "--grids", "6,8", "--speed-images", "2",
               "--quality-resolution", "128", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for name in ("oap", "oap_batched", "maskcut", "maskcut_lanczos", "tokencut", "tokencut_lanczos", "features"):
        assert res[name]["ms_per_image"] == res[name]["ms_per_image_8"] > 0
    for name in ("maskcut", "tokencut"):
        assert 0.0 <= res[name]["ap50"] <= 1.0 and "ar100" in res[name]
        ratio = res[name]["ms_per_image_8"] / res["oap"]["ms_per_image_8"]
        assert abs(res[name]["speedup_vs_oap"] - ratio) < 1e-9
    assert 0.0 <= res["oap"]["ap50"] <= 1.0
    table = capsys.readouterr().out
    assert "maskcut_lanczos" in table and "ms_per_image" in table.splitlines()[0]


def test_format_table_columns():
    t = format_table({"a": {"x": 1, "ms_per_image": 2.5}, "b": {"ms_per_image": 1.0, "y": "z"}})
    head, _, a, b = t.splitlines()
    assert head.split() == ["variant", "ms_per_image", "x", "y"]
    assert a.split() == ["a", "2.5", "1", "-"] and b.split() == ["b", "1", "-", "z"]
