"""``cam``: the plain CAM baseline of weakly supervised semantic segmentation.

Training: a multi-label classifier on image-level tags (multilabel soft-margin loss on
the pooled CAM logits; Zhou et al. 2016 CAM with a 1x1-conv head, see ``model.py``).

Inference (``labelwise infer RUN --what masks,seeds``: both from one CAM pass):

* CAMs: multi-scale + flip (``infer.scales``, ``infer.flip``) at image size, ReLU'd,
  summed and max-normalised per class (``labelwise.blocks.cam.multiscale_cam``), batched
  over consecutive images of one size;
* classes kept: the split's image tags (for the training split these are derived from
  the label PNGs or given by ``ImageSets/Tags`` — standard WSSS practice); for images
  without tags (e.g. a ``folder:`` dataset without ``tags.csv``), the classes whose
  predicted probability (sigmoid of the single-scale logits) exceeds
  ``infer.pred_threshold`` (0.5). ``infer.tags`` forces one or the other;
* ``seeds``: ``PRED/<image_id>.npz`` with ``cams`` (float16, K x H x W, one map per kept
  class) and ``keys`` (their class indices, 1-based);
* ``masks``: ``PRED/<image_id>.png``: argmax over the kept classes' CAMs, background
  where the best score ``<= infer.bg_threshold``; optional dense CRF (``infer.crf``,
  label unary with ``infer.crf_gt_prob``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from labelwise.blocks.cam import cam_to_label, multiscale_cam
from labelwise.data.transforms import ImageInput
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext, val_shard
from labelwise.errors import LabelwiseError
from labelwise.methods.cam.config import CAMConfig
from labelwise.methods.cam.model import CAMNet


class _CamTrainTransform:
    """Per-sample augmentation (labelwise.data.transforms) driven by the sampler's seed."""

    def __init__(self, cfg):
        from labelwise.modeling.backbones import pixel_stats

        self.cfg = cfg
        self.fill = pixel_stats(cfg.model.backbone)[0]  # crops are padded with the backbone's mean colour

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import seeded_train_transform

        if item.get("tags") is None:
            raise LabelwiseError(f"image {item.get('file_name', item.get('image_id'))} has no image-level tags; the "
                                 "cam method trains on tags (voc/coco masks, ImageSets/Tags, or folder tags.csv)")
        out = seeded_train_transform(self.cfg.data, self.fill, rng)({"image": item["image"]})
        return {"image": out["image"].as_subclass(torch.Tensor),
                "tags": torch.as_tensor(np.asarray(item["tags"], dtype=np.float32))}


def _snap(hw, d: int) -> tuple[int, int]:
    return tuple(max(d, round(v / d) * d) for v in hw)  # type: ignore[return-value]


@torch.no_grad()
def batch_cams(model: CAMNet, x: torch.Tensor, tags: list[np.ndarray | None], cfg, *, scales=None,
               flip=None) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Normalised CAMs of the kept classes for a batch ``x`` (``B x 3 x h x w`` in [0, 1]).

    ``tags[b]`` are image ``b``'s image-level tags (None: unknown). Returns, per image,
    ``(cams K x h x w fp32, class indices K)``; the classes kept follow ``infer.tags``.
    """
    ic = cfg.infer
    mode = ic.tags
    if mode == "gt" and any(t is None for t in tags):
        raise LabelwiseError("config key 'infer.tags' is gt but the split has no image-level tags; use auto or pred")
    need_pred = [mode == "pred" or t is None for t in tags]
    present = torch.zeros(x.shape[0], model.head.classifier.out_channels, dtype=torch.bool, device=x.device)
    if any(need_pred):
        logits = model(F.interpolate(x, size=_snap(x.shape[-2:], model.size_divisor), mode="bilinear",
                                     align_corners=False))[0]
        present |= (torch.sigmoid(logits.float()) > ic.pred_threshold) & torch.tensor(need_pred, device=x.device)[:, None]
    for b, t in enumerate(tags):
        if not need_pred[b]:
            present[b] = torch.as_tensor(np.asarray(t) > 0, device=x.device)
    cams = multiscale_cam(model.cams, x, scales=list(scales or ic.scales), flip=ic.flip if flip is None else flip,
                          out_size=tuple(x.shape[-2:]))
    present_cpu = present.cpu()
    out = []
    for b in range(x.shape[0]):  # per image: its own set of classes (a handful)
        keys = (torch.nonzero(present_cpu[b]).flatten() + 1).numpy().astype(np.int64)
        out.append((cams[b, torch.as_tensor(keys - 1, device=x.device)], keys))
    return out


def cams_to_mask(cams: torch.Tensor, keys: np.ndarray, image: np.ndarray, cfg) -> np.ndarray:
    H, W = image.shape[:2]
    if len(keys) == 0:
        return np.zeros((H, W), np.uint8)
    label = cam_to_label(cams, keys=torch.as_tensor(keys, device=cams.device),
                         bg_threshold=cfg.infer.bg_threshold).cpu().numpy()
    if cfg.infer.crf:
        from labelwise.blocks.crf import crf_refine_present

        label = crf_refine_present(image, label, keys, gt_prob=cfg.infer.crf_gt_prob)
    return label.astype(np.uint8)


class CAMMethod(Method):
    name = "cam"
    config_cls = CAMConfig
    description = "plain CAM baseline (multi-label classification on tags)"
    outputs = {"masks": "label_png", "seeds": "cam_npz"}

    def build_model(self, cfg, info, *, pretrained=True):
        return CAMNet(cfg, info.num_foreground, pretrained=pretrained)

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        if labels_dir is not None or seeds_dir is not None:
            raise LabelwiseError("the cam method trains on image-level tags only; --labels / --seeds are for "
                                 "methods that train on another stage's outputs (e.g. segmenter, irn)")
        return SeededDataset(self.load_split(cfg, spec, cfg.data.train_split), _CamTrainTransform(cfg))

    def training_step(self, model, batch, ctx: StepContext):
        logits, _ = model(batch["image"])
        cls = F.multilabel_soft_margin_loss(logits.float(), batch["tags"].float())
        return {"loss": ctx.cfg.loss.cls_weight * cls, "cls": cls.detach()}

    def evaluate(self, model, ctx: StepContext):
        """Single-scale CAM pseudo-mask mIoU on ``data.val_split`` (tags from the split), sharded over ranks."""
        from labelwise.evaluation import SemanticMetric

        cfg = ctx.cfg
        shard = val_shard(ctx)
        if shard is None:
            return None
        ds, indices = shard
        metric = SemanticMetric(ctx.info.num_classes, ctx.info.class_names)
        tf = ImageInput(max_size=cfg.infer.max_size)
        for i in indices:
            item = tf(ds[i])
            x = item["input"][None].to(ctx.device)
            [(cams, keys)] = batch_cams(model, x, [item.get("tags")], cfg, scales=[1.0], flip=False)
            metric.update(cams_to_mask(_to_image_size(cams, item["image"]), keys, item["image"], cfg), item["mask"])
        res = metric.compute()
        return {"val_miou": res["miou"], "val_pixel_acc": res["pixel_acc"]}

    # ------------------------------------------------------------------ inference
    def export_module(self, model, cfg):
        from labelwise.engine.export import MapsAtInputSize

        return MapsAtInputSize(model, "forward", index=1)  # raw CAMs at the input size (H, W multiples of the stride)

    def inference_transform(self, cfg, info):
        return ImageInput(max_size=cfg.infer.max_size)

    def predict(self, model, batch, ctx: PredictContext):
        items = batch["items"]
        per_image = batch_cams(model, batch["inputs"], [it.get("tags") for it in items], ctx.cfg)
        out = []
        for item, (cams, keys) in zip(items, per_image):
            cams = _to_image_size(cams, item["image"])
            res = {}
            if "seeds" in ctx.what:
                res["seeds"] = {"cams": cams.cpu().numpy().astype(np.float16), "keys": keys}
            if "masks" in ctx.what:
                res["masks"] = cams_to_mask(cams, keys, item["image"], ctx.cfg)
            out.append(res)
        return out


def _to_image_size(cams: torch.Tensor, image: np.ndarray) -> torch.Tensor:
    """CAMs computed on a shrunk input (``infer.max_size``) back at the image's size."""
    H, W = image.shape[:2]
    if tuple(cams.shape[-2:]) == (H, W) or cams.shape[0] == 0:
        return cams if cams.shape[0] else cams.new_zeros((0, H, W))
    return F.interpolate(cams[None], size=(H, W), mode="bilinear", align_corners=False)[0]
