"""Cross-rank reduction: two gloo processes, each with half the data, give the single-process result."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from labelwise.evaluation import InstanceEvaluator, PanopticMetric, PartsMetric, SemanticMetric, UnsupervisedMetric
from labelwise.masks import encode_mask

CATS = [{"id": 1, "name": "t", "isthing": 1}, {"id": 2, "name": "s", "isthing": 0}]


def _data():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (4, 6, 7)).astype(np.uint8)
    gt[:, 0, 0] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 4, gt.shape)).astype(np.uint8)
    pred[gt == 255] = 1
    pred[0, 1, 1] = 255
    clusters = (gt.astype(np.int64) * 2 + (rng.random(gt.shape) < 0.3)) % 7
    clusters[2:] = np.minimum(clusters[2:], 3)  # ranks see different largest cluster ids
    clusters[gt == 255] = 255
    pan_g = np.zeros((4, 6, 7), np.int64)
    pan_g[:, :3, :4] = 1
    pan_g[:, 3:] = 2
    pan_p = np.zeros_like(pan_g)
    pan_p[:, :3, :3] = 1
    pan_p[1::2, :, :] = 3
    h, w = 6, 7
    gt_coco = {"images": [{"id": i + 1, "file_name": f"{i}.jpg", "height": h, "width": w} for i in range(4)],
               "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                "segmentation": encode_mask(gt[i] == 1), "area": float((gt[i] == 1).sum()),
                                "bbox": [0, 0, 1, 1]} for i in range(4)],
               "categories": [{"id": 1, "name": "one"}]}
    results = [{"file_name": f"{i}.jpg", "category_id": 1, "segmentation": encode_mask(pred[i] == 1),
                "score": 0.5 + 0.1 * i} for i in range(4)]
    return gt, pred, clusters, pan_g, pan_p, gt_coco, results


def _run(indices):
    gt, pred, clusters, pan_g, pan_p, gt_coco, results = _data()
    sem = SemanticMetric(4)
    parts = PartsMetric(["bg", "p1", "p2", "p3"], ["bg", "o1", "o2"], [0, 1, 1, 2])
    uns = UnsupervisedMetric(None, 4)
    pan = PanopticMetric(CATS)
    inst = InstanceEvaluator(gt_coco)
    for i in indices:
        sem.update(pred[i], gt[i])
        parts.update(pred[i], gt[i], np.array([0, 1, 1, 2] + [0] * 251 + [255], np.uint8)[pred[i]], gt[i] % 3)
        uns.update(clusters[i], gt[i])
        pan.update(pan_p[i], [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 2}],
                   pan_g[i], [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}])
        inst.update([results[i]])
    return [sem.compute(), parts.compute(), uns.compute(), pan.compute(), inst.compute()]


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from labelwise.dist import shutdown

    ok = False
    try:
        res = _run(range(rank, 4, world))
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(res, f)
        ok = True
    finally:
        shutdown(ok)  # the ranks meet before leaving (gloo aborts a peer that is still talking)


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float):
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)
    else:
        assert a == b


@pytest.mark.timeout(120)
def test_two_gloo_ranks_equal_single_process(tmp_path):
    single = _run(range(4))
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            _same(pickle.load(f), single)
    # the data exercises the interesting paths
    assert 0 < single[0]["miou"] < 1 and single[2]["num_clusters"] == 7 and single[4]["num_predictions"] == 4
    assert 0 < single[3]["pq"] < 1
