"""``kmax``: kMaX-DeepLab trained for object parsing (part and object levels); the base of ``cocal``.

Training: random rescale / crop / flip / colour jitter of image + part + object labels
(``data.*``); per image, the semantic segments of each level (one mask per class present, 255
ignored) are the targets of that level's query group. kMaX-DeepLab matches them with the
Hungarian algorithm on ``-(dice x p(class))`` (``blocks.kmax_losses.kmax_match``); CoCal's
dictionary maps each segment to its class's component instead (``fixed_match``). The losses are
kMaX-DeepLab's (``blocks.kmax_losses``): PQ-style class + dice, mask-ID cross-entropy, pixel-wise
instance discrimination (every decoder prediction with ``loss.deep_supervision``) and the
auxiliary semantic cross-entropy of each level. With ``model.decoder=mask2former`` (CoCal Table 5)
the network is Mask2Former's and so are the matching (class + BCE + dice cost) and the losses
(class cross-entropy with no-object 0.1, BCE + dice on sampled points, every layer;
``blocks.mask2former_losses``); it has no auxiliary semantic head.

Inference (``labelwise infer RUN --what parts``): per-level class probabilities
(``model.level_probabilities``) at image size, arg-maxed per level (kMaX-DeepLab: the two levels
are independent, so their consistency is measured, not assumed), written as part and object
PNGs through the inference engine.
"""

from __future__ import annotations

import numpy as np
import torch

from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX
from labelwise.methods.kmax.config import KMaXConfig
from labelwise.methods.kmax.model import build_parser, level_probabilities, upsample


class _ParsingTrainTransform:
    """Image + part + object labels through the usual seeded augmentation (``data.*``)."""

    def __init__(self, cfg):
        from labelwise.modeling.backbones import pixel_stats

        self.cfg = cfg
        self.fill = pixel_stats(cfg.model.backbone)[0]

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import seeded_train_transform

        if item.get("parts") is None:
            raise LabelwiseError(f"image {item.get('file_name', item.get('image_id'))} has no part labels; train on a "
                                 "parts:ROOT dataset (or a release adapter such as partimagenet:)")
        out = seeded_train_transform(self.cfg.data, self.fill, rng)(
            {"image": item["image"], "parts": item["parts"], "objects": item["objects"]})
        return {k: out[k].as_subclass(torch.Tensor) for k in ("image", "parts", "objects")}


class _ParsingInput:
    """Inference input: the image as [0, 1] floats, shrunk to ``max_size`` (0 = keep), both sides
    rounded to multiples of 32 (the coarsest stride; outputs are resized back to the image)."""

    def __init__(self, max_size: int = 0):
        self.max_size = int(max_size)

    def __call__(self, item: dict) -> dict:
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float().div_(255.0)
        H, W = x.shape[-2:]
        s = self.max_size / max(H, W) if self.max_size and max(H, W) > self.max_size else 1.0
        h, w = max(32, round(H * s / 32) * 32), max(32, round(W * s / 32) * 32)
        if (h, w) != (H, W):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return {**item, "input": x}


def level_targets(label: torch.Tensor, group: int, offset: int = 0):
    """One image's semantic segments of one level: ``(masks (M, H, W) bool, classes (M,) + offset,
    group (M,))``, one per class present in ``label`` (255 ignored)."""
    classes = torch.unique(label)
    classes = classes[classes != IGNORE_INDEX]
    masks = label[None] == classes[:, None, None]
    return masks, classes.long() + offset, torch.full_like(classes, group, dtype=torch.long)


class KMaXMethod(Method):
    name = "kmax"
    config_cls = KMaXConfig
    description = "kMaX-DeepLab object parsing (part + object levels; the baseline of CoCal)"
    outputs = {"parts": "parts_png"}
    testbed = "parts"

    dictionary = False  # CoCal's subclass turns it on with cocal.dictionary

    def uses_dictionary(self, cfg) -> bool:
        return self.dictionary

    # ------------------------------------------------------------------ model
    def build_model(self, cfg, info, *, pretrained=True):
        cfg.validate_levels()
        if getattr(info, "part_names", None) is None:
            raise LabelwiseError(f"method '{self.name}' parses parts: train on a parts:ROOT dataset (or a release "
                                 "adapter: partimagenet:, pascalpart:) that lists part and object classes")
        return build_parser(cfg, len(info.part_names), len(info.class_names), dictionary=self.uses_dictionary(cfg),
                            pretrained=pretrained)

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        if labels_dir is not None or seeds_dir is not None:
            raise LabelwiseError(f"{self.name} trains on the dataset's part and object labels; --labels / --seeds do "
                                 "not apply")
        if cfg.data.crop_size % 32:
            raise LabelwiseError(f"config key 'data.crop_size' = {cfg.data.crop_size}: kMaX-DeepLab needs a multiple "
                                 "of 32 (its coarsest stride)")
        return SeededDataset(self.load_split(cfg, spec, cfg.data.train_split), _ParsingTrainTransform(cfg))

    # ------------------------------------------------------------------ training
    def targets(self, model, batch) -> list[tuple]:
        """Per image: the part-level and object-level segments with their group (0 parts, 1 objects);
        kMaX's joint class space puts object classes after the parts."""
        P = model.num_parts
        off = 0 if model.dictionary else P
        out = []
        for parts, objects in zip(batch["parts"], batch["objects"]):
            mp, cp, gp = level_targets(parts.long(), 0)
            mo, co, go = level_targets(objects.long(), 1, off)
            out.append((torch.cat([mp, mo]), torch.cat([cp, co]), torch.cat([gp, go])))
        return out

    @staticmethod
    def dictionary_match(model, targets, device) -> list:
        """CoCal: component i of a level is class i (no Hungarian matching); object components follow
        the part components."""
        from labelwise.blocks.kmax_losses import fixed_match

        P, O = model.num_parts, model.num_objects
        return fixed_match(targets, [torch.arange(P, device=device), P + torch.arange(O, device=device)])

    def match(self, model, out: dict, targets) -> list:
        from labelwise.blocks.kmax_losses import kmax_match
        from labelwise.modeling.decoders import group_softmax

        if model.dictionary:
            return self.dictionary_match(model, targets, out["pred_masks"].device)
        probs = group_softmax(out["pred_masks"].detach().float(), model.query_groups)
        return kmax_match(out.get("pred_logits"), probs, targets, groups=model.query_groups)

    def decoder_loss(self, model, out: dict, batch, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """The mask transformer's own loss (CoCal's L_kMaX): kMaX-DeepLab's, or Mask2Former's with
        ``model.decoder=mask2former``."""
        if ctx.cfg.model.decoder == "mask2former":
            return self.mask2former_loss(model, out, batch, ctx)
        return self.kmax_loss(model, out, batch, ctx)

    def mask2former_loss(self, model, out: dict, batch, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """Mask2Former's criterion on every decoder prediction: Hungarian matching within each level
        (fixed matching with the dictionary), class CE + BCE + dice; absent dictionary components
        are negatives (``blocks.mask2former_losses``)."""
        from labelwise import dist
        from labelwise.blocks.mask2former_losses import mask2former_losses, mask2former_match

        lc, mc = ctx.cfg.loss, ctx.cfg.loss.mask2former
        targets = self.targets(model, batch)
        dev = out["pred_masks"].device
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(ctx.cfg.train.seed) * 1_000_003 + ctx.step * 131 + ctx.rank)
        preds = [out] + (list(out["aux_outputs"]) if lc.deep_supervision else [])
        C = None if model.dictionary else model.num_parts + model.num_objects
        fixed = self.dictionary_match(model, targets, dev) if model.dictionary else None
        # Mask2Former's num_masks: the batch's target segments, averaged over ranks (kept on device)
        n_local = torch.tensor(float(sum(t[1].numel() for t in targets)), device=dev)
        num_masks = (dist.all_reduce_sum(n_local) / max(ctx.world_size, 1)).clamp(min=1.0)
        weights = {"class": mc.class_weight, "mask": mc.mask, "dice": mc.dice}
        total = out["pred_masks"].new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for k, p in enumerate(preds):
            m = fixed if fixed is not None else mask2former_match(
                p.get("pred_logits"), p["pred_masks"], targets, groups=model.query_groups, weights=weights,
                num_points=mc.num_points, generator=gen)
            terms = mask2former_losses(p, targets, m, num_classes=C, num_masks=num_masks, no_object=mc.no_object,
                                       num_points=mc.num_points, oversample=mc.oversample,
                                       importance=mc.importance, absent_negative=model.dictionary, generator=gen)
            total = total + mc.mask * terms["loss_mask"] + mc.dice * terms["loss_dice"]
            if "loss_ce" in terms:
                total = total + mc.class_weight * terms["loss_ce"]
            if k == 0:
                logs.update({name[5:]: v.detach() for name, v in terms.items()})
        return total, logs

    def kmax_loss(self, model, out: dict, batch, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """L_kMaX: the losses of every decoder prediction + the auxiliary semantic losses."""
        from labelwise.blocks.kmax_losses import kmax_losses, loss_aux_semantic

        lc = ctx.cfg.loss
        weights = {"loss_pq_class": lc.pq_class, "loss_pq_dice": lc.pq_dice, "loss_mask": lc.mask,
                   "loss_instdisc": lc.instdisc}
        targets = self.targets(model, batch)
        gen = torch.Generator(device=out["pred_masks"].device)
        gen.manual_seed(int(ctx.cfg.train.seed) * 1_000_003 + ctx.step * 131 + ctx.rank)
        preds = [out] + (list(out["aux_outputs"]) if lc.deep_supervision else [])
        C = model.num_parts + model.num_objects  # the joint class space (only the class head reads it)
        total = out["pred_masks"].new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for k, p in enumerate(preds):
            terms = kmax_losses(p, targets, self.match(model, p, targets), num_classes=C, weights=weights,
                                focal_alpha=lc.focal_alpha, focal_gamma=lc.focal_gamma,
                                groups=model.query_groups, generator=gen, insdis_sample_k=lc.instdisc_samples,
                                insdis_temperature=lc.instdisc_temperature)
            for name, v in terms.items():
                total = total + v
                if k == 0:
                    logs[name[5:]] = v.detach()
        for level in ("parts", "objects"):
            aux = loss_aux_semantic(out["aux_semantic"][level], batch[level].long(), IGNORE_INDEX,
                                    weight=lc.aux_semantic)
            total = total + aux
            logs[f"aux_{level}"] = aux.detach()
        return total, logs

    def training_step(self, model, batch, ctx: StepContext):
        out = model(batch["image"])
        total, logs = self.decoder_loss(ctx.module, out, batch, ctx)
        return {"loss": total, **logs}

    # ------------------------------------------------------------------ inference
    def inference_transform(self, cfg, info):
        return _ParsingInput(cfg.infer.max_size)

    def parse(self, part_prob: torch.Tensor, object_prob: torch.Tensor, ctx: PredictContext
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(parts (B, H, W), objects (B, H, W))`` labels from the two levels' class probabilities
        at image size. kMaX-DeepLab: each level's argmax on its own."""
        return part_prob.argmax(1), object_prob.argmax(1)

    def export_module(self, model, cfg):
        return _PartObjectProbabilities(model)

    def predict(self, model, batch, ctx: PredictContext):
        out = model(batch["inputs"])
        pp, po = level_probabilities(out, model.num_parts, model.num_objects, model.dictionary, model.mask_activation)
        res = []
        for b, item in enumerate(batch["items"]):  # images of one input size, each back to its own size
            size = item["image"].shape[:2]
            parts, objects = self.parse(upsample(pp[b:b + 1], size), upsample(po[b:b + 1], size), ctx)
            res.append({"parts": {"parts": parts[0].to(torch.uint8).cpu().numpy(),
                                  "objects": objects[0].to(torch.uint8).cpu().numpy()}})
        return res


class _PartObjectProbabilities(torch.nn.Module):
    """``labelwise export``: images -> part and object class probabilities, concatenated along the
    channels (parts first), at the input size; parsing (argmax or CoCal's paths) stays in Python."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        m = self.model
        pp, po = level_probabilities(m(images), m.num_parts, m.num_objects, m.dictionary, m.mask_activation)
        size = images.shape[-2:]
        return torch.cat([upsample(pp, size), upsample(po, size)], dim=1)
