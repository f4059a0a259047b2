"""COCO RLE helpers: exact round trips and agreement with pycocotools."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from labelwise.masks import decode_mask, decode_masks, encode_mask, encode_masks, mask_area, mask_to_bbox


def _cases():
    rng = np.random.default_rng(0)
    out = [rng.random((17, 23)) > 0.5, rng.random((1, 1)) > 0.5, np.zeros((5, 7), bool), np.ones((9, 4), bool)]
    one = np.zeros((13, 11), bool)
    one[12, 0] = True
    out.append(one)
    out.append(rng.random((31, 1)) > 0.3)
    return out


@pytest.mark.parametrize("m", _cases())
def test_round_trip_exact(m):
    rle = encode_mask(m)
    assert rle["size"] == [m.shape[0], m.shape[1]] and isinstance(rle["counts"], str)
    d = decode_mask(rle)
    assert d.dtype == bool and np.array_equal(d, m)
    # bytes counts decode too, and counts equal pycocotools' own encoding
    ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert ref["counts"].decode() == rle["counts"]
    assert np.array_equal(decode_mask({"size": rle["size"], "counts": rle["counts"].encode()}), m)


def test_encode_masks_vectorised_matches_single_and_torch():
    rng = np.random.default_rng(1)
    ms = rng.random((4, 9, 14)) > 0.6
    ms[1] = False
    rles = encode_masks(torch.from_numpy(ms))
    assert [r["counts"] for r in rles] == [encode_mask(m)["counts"] for m in ms]
    assert np.array_equal(decode_masks(rles), ms)
    assert encode_masks(np.zeros((0, 3, 3), bool)) == []


def test_bbox_area_and_polygon():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True  # rows 2..4, cols 3..8
    assert mask_to_bbox(m).tolist() == [3.0, 2.0, 6.0, 3.0]
    assert mask_area(m) == 18
    assert mask_to_bbox(np.zeros((4, 4), bool)).tolist() == [0, 0, 0, 0]
    stack = np.stack([m, np.zeros_like(m)])
    assert mask_to_bbox(stack).tolist() == [[3, 2, 6, 3], [0, 0, 0, 0]]
    assert mask_area(stack).tolist() == [18, 0]
    # agrees with pycocotools toBbox
    ref = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
    assert np.allclose(ref, mask_to_bbox(m))
    # polygon: axis-aligned square 0..4 -> pycocotools rasterises it; same as its own decode
    poly = [[0, 0, 4, 0, 4, 4, 0, 4]]
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 6, 6))).astype(bool)
    got = decode_mask(poly, 6, 6)
    assert np.array_equal(got, ref) and got.sum() > 0
    with pytest.raises(ValueError):
        decode_mask(poly)
    # uncompressed RLE (list counts): 2 zeros, 3 ones, 1 zero in column-major order of 3x2
    assert decode_mask({"size": [3, 2], "counts": [2, 3, 1]}).T.reshape(-1).tolist() == [0, 0, 1, 1, 1, 0]


def test_rle_counts_are_the_run_lengths_and_corrupt_rles_are_named():
    """rle_counts decodes pycocotools' compressed strings to the runs of the Fortran-order mask;
    segmentation_problem names truncated / garbled RLEs (which pycocotools decodes to garbage
    without an error), wrong sizes and odd-length polygons."""
    from labelwise.masks import encode_mask, rle_counts, segmentation_problem

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        runs, value, n = [], False, 0  # COCO's runs: column-major, alternating, starting with zeros
        for v in m.flatten(order="F"):
            if v == value:
                n += 1
            else:
                runs.append(n)
                value, n = v, 1
        runs.append(n)
        rle = encode_mask(m)
        assert rle_counts(rle["counts"]).tolist() == runs
        assert segmentation_problem(rle, h, w) is None
    rle = encode_mask(np.pad(np.ones((5, 10), bool), ((5, 10), (5, 15))))
    assert "truncated" in segmentation_problem({"size": rle["size"], "counts": rle["counts"][:-2]})
    assert "outside" in segmentation_problem({"size": rle["size"], "counts": "bad!"})
    assert "differs" in segmentation_problem(rle, 10, 10)
    assert "even number" in segmentation_problem([[1, 2, 3, 4, 5]], 20, 30)
    assert segmentation_problem([[1, 2, 3, 4, 5, 6]], 20, 30) is None
    assert segmentation_problem({"size": [2, 3], "counts": [1, 2, 3]}) is None
    assert "cover 5" in segmentation_problem({"size": [2, 3], "counts": [1, 2, 2]})


def test_coco_dataset_of_a_json_that_is_no_results_list_is_a_one_line_error(tmp_path):
    import json

    import pytest

    import labelwise as lw
    from labelwise.errors import LabelwiseError

    f = tmp_path / "run.json"
    f.write_text(json.dumps({"method": "cam"}))
    with pytest.raises(LabelwiseError, match=r"run\.json: not a COCO results list") as e:
        lw.coco_dataset(f)
    assert "\n" not in str(e.value) and not (tmp_path / "run_dataset.json").exists()
