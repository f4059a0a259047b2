"""Learns-test of SeCo's network: the cpu preset's model (a ViT trained from scratch, its
classification heads and the DeepLabV2 segmentation head) overfits a handful of testbed images
with ground-truth targets (tags for the classifiers, label maps for the segmentation head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F


@pytest.mark.slow
def test_seco_network_overfits_ground_truth_masks(tmp_path):
    from labelwise.data.spec import build_dataset
    from labelwise.data.synth import generate
    from labelwise.engine.api import resolve_method_config
    from labelwise.engine.registry import get_method
    from labelwise.evaluation.semantic import SemanticMetric

    torch.manual_seed(0)
    root = generate("cooc", tmp_path / "cooc", n_train=8, n_val=2, size=96, seed=0)
    ds = build_dataset(f"voc:{root}", "train")
    method = get_method("seco")
    cfg = resolve_method_config(method, "cpu", overrides=[
        "model.timm_kwargs={patch_size: 8, embed_dim: 192, depth: 6, num_heads: 3, img_size: 96}"])
    model = method.build_model(cfg, ds.info, pretrained=False).train()
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(ds[i]["image"])).permute(2, 0, 1).float() / 255
                          for i in range(len(ds))])
    masks = torch.stack([torch.from_numpy(ds.load_mask(i).astype(np.int64)) for i in range(len(ds))])
    tags = torch.stack([torch.as_tensor(ds.tags(i), dtype=torch.float32) for i in range(len(ds))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(100):
        out = model(images)
        seg = F.interpolate(out["seg"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(seg, masks, ignore_index=255) \
            + F.multilabel_soft_margin_loss(out["logits"], tags) + F.multilabel_soft_margin_loss(out["logits_aux"], tags)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(images)
        pred = F.interpolate(out["seg"], size=images.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
    ev = SemanticMetric(len(ds.info.class_names))
    for p, g in zip(pred.numpy(), masks.numpy()):
        ev.update(p, g)
    miou = ev.compute()["miou"]
    # every image's tags recovered by the classifier, the masks fitted beyond what the 12 x 12 token grid
    # itself carries: measured (1 thread) mIoU 0.794 after 100 steps, 0.824 after 200, where the
    # ground truth pooled to the token grid and upsampled scores 0.754
    assert ((out["logits"] > 0).float() == tags).all()
    assert miou > 0.7, miou
