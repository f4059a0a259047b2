"""``segmenter``: DeepLabV3+ trained fully supervised on a folder of label PNGs.

The last stage of every WSSS pipeline: ``labelwise train segmenter --data SPEC --labels
PRED_DIR`` trains on the pseudo-masks of any method (``labelwise infer RUN --what masks`` of
cam / seco / cobra / irn); without ``--labels`` it trains on the dataset's own masks, the
fully supervised reference (logged at the start of training).

Training (DeepLabV3+ Sec. 4): random rescale (``data.scale_range``), horizontal flip, a
``data.crop_size`` crop padded with the backbone's mean colour and 255 (ignore) in the
label; pixel-wise cross-entropy over the logits at the input size, 255 ignored.

Evaluation (``train.eval_every`` / at the end): single-scale val mIoU on the dataset's own
masks of ``data.val_split``.

Inference (``labelwise infer RUN --what segmentation``): the image (shrunk so its long side
is <= ``infer.max_size`` when set) at every scale of ``infer.scales`` and, with
``infer.flip``, mirrored; the logits of each pass are bilinearly resized to the input, their
softmax probabilities averaged (:func:`multiscale_probs`), resized to the image, optionally
refined by a dense CRF (``infer.crf``) and arg-maxed into a VOC-palette label PNG.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from labelwise import dist
from labelwise.data.transforms import ImageInput
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext, val_shard
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX
from labelwise.methods.segmenter.config import SegmenterConfig
from labelwise.methods.segmenter.model import build_segmenter


class _SegTrainTransform:
    """Per-sample augmentation of image + label (labelwise.data.transforms) from the sampler's seed."""

    def __init__(self, cfg):
        from labelwise.modeling.backbones import pixel_stats

        self.cfg = cfg
        self.fill = pixel_stats(cfg.model.backbone)[0]  # crops are padded with the backbone's mean colour

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import seeded_train_transform

        if item.get("mask") is None:
            raise LabelwiseError(f"image {item.get('file_name', item.get('image_id'))} has no label mask; pass "
                                 "--labels PRED_DIR (label PNGs of labelwise infer RUN --what masks)")
        out = seeded_train_transform(self.cfg.data, self.fill, rng)({"image": item["image"], "mask": item["mask"]})
        return {"image": out["image"].as_subclass(torch.Tensor), "mask": out["mask"].as_subclass(torch.Tensor)}


def multiscale_probs(model, x: torch.Tensor, scales, flip: bool = True) -> torch.Tensor:
    """Class probabilities ``B x C x H x W`` of ``x`` (``B x 3 x H x W`` in [0, 1]): the mean over
    ``scales`` (x ``flip``) of ``softmax(resize(model(resize(x, s)), (H, W)))``, flipped passes
    mirrored back. Each scale runs the original and the mirrored images in one batch."""
    B = x.shape[0]
    H, W = x.shape[-2:]
    total = None
    for s in scales:
        v = x if s == 1.0 else F.interpolate(x, size=(max(1, round(H * s)), max(1, round(W * s))), mode="bilinear",
                                             align_corners=False)
        if flip:
            v = torch.cat([v, v.flip(-1)])
        logits = model(v).float()
        if tuple(logits.shape[-2:]) != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        p = logits.softmax(1)
        p = p[:B] + p[B:].flip(-1) if flip else p
        total = p if total is None else total + p
    return total / (len(scales) * (2 if flip else 1))


def probs_to_label(probs: torch.Tensor, image: np.ndarray, ic) -> np.ndarray:
    """``C x h x w`` probabilities -> ``H x W`` uint8 label at the image's size (optional dense CRF)."""
    H, W = image.shape[:2]
    if tuple(probs.shape[-2:]) != (H, W):
        probs = F.interpolate(probs[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    if ic.crf:
        from labelwise.blocks.crf import dense_crf

        q = dense_crf(image, probs.cpu().numpy(), iters=ic.crf_iters, pos_xy=ic.crf_pos_xy, pos_w=ic.crf_pos_w,
                      bi_xy=ic.crf_bi_xy, bi_rgb=ic.crf_bi_rgb, bi_w=ic.crf_bi_w)
        return q.argmax(0).astype(np.uint8)
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


class SegmenterMethod(Method):
    name = "segmenter"
    config_cls = SegmenterConfig
    description = "DeepLabV3+ trained on label PNGs (--labels: pseudo-masks; none: the dataset's masks)"
    outputs = {"segmentation": "label_png"}

    def build_model(self, cfg, info, *, pretrained=True):
        return build_segmenter(cfg, info.num_classes, pretrained=pretrained)

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        if seeds_dir is not None:
            raise LabelwiseError("the segmenter trains on label PNGs (--labels PRED_DIR); --seeds is for methods that "
                                 "refine CAM seeds (e.g. irn)")
        ds = self.load_split(cfg, spec, cfg.data.train_split, labels_dir=labels_dir)
        if labels_dir is None:
            if len(ds) and ds.load_mask(0) is None:
                raise LabelwiseError(f"{spec} split '{cfg.data.train_split}' has no masks to train on; pass --labels "
                                     "PRED_DIR (label PNGs of labelwise infer RUN --what masks)")
            if dist.is_main():
                print(f"labelwise: segmenter: no --labels, training on the dataset's own masks of split "
                      f"'{cfg.data.train_split}' (the fully supervised reference)", flush=True)
        elif dist.is_main():
            print(f"labelwise: segmenter: training on the label PNGs of {labels_dir}", flush=True)
        return SeededDataset(ds, _SegTrainTransform(cfg))

    def training_step(self, model, batch, ctx: StepContext):
        logits = model(batch["image"])
        # Pixel-wise cross-entropy at the input size, ignore 255 (DeepLabV3+ Sec. 4).
        ce = F.cross_entropy(logits.float(), batch["mask"].long(), ignore_index=IGNORE_INDEX,
                             label_smoothing=ctx.cfg.loss.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}

    def evaluate(self, model, ctx: StepContext):
        """Single-scale val mIoU on ``data.val_split``'s own masks, sharded over ranks."""
        from labelwise.evaluation import SemanticMetric

        shard = val_shard(ctx)
        if shard is None:
            return None
        ds, indices = shard
        metric = SemanticMetric(ctx.info.num_classes, ctx.info.class_names)
        tf = ImageInput(max_size=ctx.cfg.infer.max_size)
        with torch.no_grad():
            for i in indices:
                item = tf(ds[i])
                probs = multiscale_probs(model, item["input"][None].to(ctx.device), [1.0], flip=False)[0]
                H, W = item["image"].shape[:2]
                if tuple(probs.shape[-2:]) != (H, W):
                    probs = F.interpolate(probs[None], size=(H, W), mode="bilinear", align_corners=False)[0]
                metric.update(probs.argmax(0), torch.as_tensor(item["mask"]))
        res = metric.compute()
        return {"val_miou": res["miou"], "val_pixel_acc": res["pixel_acc"]}

    # ------------------------------------------------------------------ inference
    def export_module(self, model, cfg):
        from labelwise.engine.export import MapsAtInputSize

        return MapsAtInputSize(model, "forward")  # segmentation logits at the input size

    def inference_transform(self, cfg, info):
        return ImageInput(max_size=cfg.infer.max_size)

    def predict(self, model, batch, ctx: PredictContext):
        ic = ctx.cfg.infer
        probs = multiscale_probs(model, batch["inputs"], list(ic.scales), flip=ic.flip)
        return [{"segmentation": probs_to_label(probs[b], item["image"], ic)} for b, item in enumerate(batch["items"])]
