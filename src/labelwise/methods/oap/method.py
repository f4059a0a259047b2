"""``oap``: the training step (teacher OAP targets -> cropped matching -> mask, objectness and
distillation losses), the DINO-style hooks and inference (universal masks; the teacher's own
pseudo-masks). See the package docstring."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from labelwise import dist
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method, PredictContext, StepContext
from labelwise.errors import LabelwiseError
from labelwise.methods.oap import losses as L
from labelwise.methods.oap.config import OAPTrainConfig
from labelwise.methods.oap.model import OAPNet, teacher_targets


class OAPState(nn.Module):
    """What OAP keeps across steps outside the model: the DINO centre ``c`` of the teacher codes
    (Eq. 1's centring; updated identically on every rank from all-reduced sums)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, out_dim))


class _TrainTransform:
    """Per-sample multi-crop driven by the sampler's seed: one global view (``oap.global_size``,
    area ``oap.global_scale`` of the image, flipped with p 0.5) for the teacher, and ``oap.n_local``
    local views (``oap.local_size``, area ``oap.local_scale`` *of the global view's region*, cut from
    the original pixels, each flipped with p 0.5) for the student. ``local_boxes`` are the local
    regions in pixels of the unflipped global view (what cropped matching needs)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        from labelwise.data.transforms import MultiCropTransform

        o = self.cfg.oap
        flip_p = 0.5 if self.cfg.data.flip else 0.0
        g = torch.Generator()
        g.manual_seed(int(rng.integers(0, 2 ** 62)))
        img = np.ascontiguousarray(item["image"])
        glob = MultiCropTransform(global_size=o.global_size, n_global=1, n_local=0,
                                  global_scale=tuple(o.global_scale), flip_p=flip_p, generator=g)({"image": img})
        x0, y0, x1, y1 = glob["global_boxes"][0].tolist()
        sub = np.ascontiguousarray(img[y0:y1, x0:x1])
        loc = MultiCropTransform(local_size=o.local_size, n_global=0, n_local=o.n_local,
                                 local_scale=tuple(o.local_scale), flip_p=flip_p, generator=g)({"image": sub})
        scale = torch.tensor([o.global_size / (x1 - x0), o.global_size / (y1 - y0)] * 2, dtype=torch.float32)
        extra = {}
        if o.targets == "ground_truth":  # diagnostic control (oap.targets): the dataset's masks of the global view
            extra = _ground_truth_maps(item, (x0, y0, x1, y1), o.global_size, bool(glob["global_flips"][0]))
        return {**extra, "global": glob["global_views"][0].as_subclass(torch.Tensor),
                "global_flip": torch.as_tensor(bool(glob["global_flips"][0])),
                "locals": torch.stack([v.as_subclass(torch.Tensor) for v in loc["local_views"]]),
                "local_boxes": loc["local_boxes"].float() * scale,
                "local_flips": loc["local_flips"].bool()}


def _ground_truth_maps(item: dict, box, size: int, flip: bool) -> dict:
    """``oap.targets=ground_truth``: the item's instance-id map (0 = none, 1..N in annotation order)
    and semantic class map (255 = ignore) cut to the global view's ``box``, resized (nearest) to
    ``size`` and mirrored like the view -- the frame of the teacher's keys."""
    import torch.nn.functional as F

    if "instances" not in item or item.get("mask") is None:
        raise LabelwiseError("oap.targets=ground_truth needs instance and semantic masks (a coco:ROOT dataset); "
                             "use oap.targets=oap")
    H, W = item["image"].shape[:2]
    inst = np.zeros((H, W), np.int64)
    for k, ins in enumerate(item["instances"], start=1):
        inst[np.asarray(ins["mask"], bool)] = k
    x0, y0, x1, y1 = box
    maps = torch.stack([torch.from_numpy(inst[y0:y1, x0:x1]),
                        torch.from_numpy(np.asarray(item["mask"], np.int64)[y0:y1, x0:x1])]).float()
    maps = F.interpolate(maps[None], size=(size, size), mode="nearest")[0].long()
    if flip:
        maps = maps.flip(-1)
    return {"gt_instances": maps[0], "gt_semantic": maps[1]}


def _ground_truth_masks(inst: torch.Tensor, sem: torch.Tensor, levels) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's ground-truth masks ``(T, S, S)`` bool and levels ``(T,)`` from its maps: every
    class region of ``sem`` (semantic level, 255 skipped) and every instance of ``inst``."""
    from labelwise.methods.oap.model import LEVEL_IDS

    ms, lv = [], []
    for name, m, skip in (("semantic", sem, 255), ("instance", inst, 0)):
        if name not in levels:
            continue
        ids = torch.unique(m)
        ids = ids[ids != skip]
        ms.append(m[None] == ids[:, None, None])
        lv.append(torch.full((len(ids),), LEVEL_IDS[name], dtype=torch.long, device=m.device))
    return torch.cat(ms), torch.cat(lv)


class _InferTransform:
    """The image as [0, 1] floats, long side resized to ``size``, both sides multiples of 32
    (the coarsest encoder stride)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, item: dict) -> dict:
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float().div_(255.0)
        H, W = x.shape[-2:]
        s = self.size / max(H, W)
        h, w = max(32, round(H * s / 32) * 32), max(32, round(W * s / 32) * 32)
        return {**item, "input": F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]}


class OAPMethod(Method):
    name = "oap"
    config_cls = OAPTrainConfig
    description = "OAP: online agglomerative pooling, self-supervised universal segmentation (teacher-student)"
    outputs = {"universal": "universal", "pseudo": "clustered_masks"}
    uses_ema = True
    supports_accumulation = False  # after_optimizer_step uses the state of the step's one forward
    testbed = "objects"
    label_free = True  # trained without labels: infers on any dataset (its clusters are not its classes)

    def __init__(self):
        self._center_logits = None
        self._pooling = None
        self._initial = None  # infer.teacher=initial: built once per inference pass

    # ------------------------------------------------------------------ model and state
    def build_model(self, cfg, info, *, pretrained=True):
        return OAPNet(cfg, pretrained=pretrained)

    def build_state(self, cfg, info):
        return OAPState(cfg.model.out_dim)

    def ema_module(self, model):
        return model  # the teacher is an EMA of the whole network (encoder, decoders, head)

    def ema_momentum(self, cfg, step, max_steps):
        from labelwise.blocks.ema import momentum_schedule

        return momentum_schedule(cfg.oap.momentum_schedule, cfg.oap.teacher_momentum, 1.0, max_steps)(step)

    def pooling(self, cfg):
        if self._pooling is None:
            from labelwise.pseudo.oap.pooling import OnlineAgglomerativePooling

            self._pooling = OnlineAgglomerativePooling(cfg.pooling)
        return self._pooling

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        if labels_dir is not None or seeds_dir is not None:
            raise LabelwiseError("oap is self-supervised: --labels / --seeds do not apply")
        return SeededDataset(self.load_split(cfg, spec, cfg.data.train_split), _TrainTransform(cfg))

    # ------------------------------------------------------------------ one step
    def training_step(self, model, batch, ctx: StepContext):
        cfg, lc, oc = ctx.cfg, ctx.cfg.loss, ctx.cfg.oap
        if ctx.teacher is None:
            raise LabelwiseError("oap needs the trainer's EMA teacher (uses_ema)")
        teacher = getattr(ctx.teacher, "module", ctx.teacher)
        xg, xl = batch["global"], batch["locals"]
        B, n = xl.shape[:2]
        # Teacher: OAP on its keys of the global view, every step, batched (Sec. 4.2-4.3).
        given = None
        if oc.targets == "ground_truth":  # diagnostic control: the dataset's masks replace OAP's (oap.targets)
            given = [_ground_truth_masks(batch["gt_instances"][b], batch["gt_semantic"][b], oc.levels)
                     for b in range(xg.shape[0])]
        tg = teacher_targets(teacher, xg, self.pooling(cfg), levels=tuple(oc.levels), max_targets=oc.max_targets,
                             given=given)
        # Student: the local views (and, with oap.student_global, the global view itself: its box is
        # the whole view, seen as the teacher saw it). Views of one size go through one forward.
        full = xg.new_tensor([0.0, 0.0, oc.global_size, oc.global_size])
        groups = [(xl.flatten(0, 1), [(b, batch["local_boxes"][b, j], bool(batch["local_flips"][b, j]))
                                      for b in range(B) for j in range(n)])]
        if oc.student_global:
            groups.append((xg, [(b, full, bool(batch["global_flip"][b])) for b in range(B)]))
        gen = torch.Generator(device=xl.device)
        gen.manual_seed(int(cfg.train.seed) * 1_000_003 + ctx.step * 131 + ctx.rank)
        views = []  # per group: (outputs of every supervised layer, targets per view, matches per layer)
        for x, boxes in groups:
            out = model(x)
            hw = tuple(out["pred_masks"].shape[-2:])
            targets = [L.crop_targets(tg[b].masks, tg[b].level, tg[b].logits, box, oc.global_size,
                                      bool(batch["global_flip"][b]), flip, hw) for b, box, flip in boxes]
            preds = [out] + (list(out["aux_outputs"]) if lc.deep_supervision else [])
            matches = [L.match_views(p["pred_masks"], out["level"], targets, lc.match_points, gen) for p in preds]
            views.append((preds, targets, matches))
        # Mask2Former's num_masks: matched pairs of the last layer over all views, averaged over ranks.
        n_local = torch.tensor(float(sum(len(q) for _, _, m in views for q, _ in m[0])), device=xl.device)
        num_masks = max(float(dist.all_reduce_sum(n_local)) / max(ctx.world_size, 1), 1.0)
        total = xl.new_zeros(())
        logs = {}
        for k in range(len(views[0][0])):  # every supervised decoder layer, the last one first
            loss_mask = loss_dice = 0.0
            for preds, targets, matches in views:  # BCE + Dice summed over pairs / num_masks
                ml = L.oap_mask_loss(preds[k]["pred_masks"], targets, matches[k], num_masks,
                                     num_points=lc.num_points, oversample=lc.oversample, importance=lc.importance,
                                     generator=gen)
                loss_mask, loss_dice = loss_mask + ml["loss_mask"], loss_dice + ml["loss_dice"]
            total = total + lc.mask * loss_mask + lc.dice * loss_dice
            if k == 0:
                logs.update(mask=loss_mask.detach(), dice=loss_dice.detach())
            if "pred_logits" in views[0][0][k]:  # one class loss over the queries of every view
                obj = L.objectness_loss(torch.cat([preds[k]["pred_logits"] for preds, _, _ in views]),
                                        [q for _, _, m in views for q in m[k]], lc.no_object)
                total = total + lc.objectness * obj
                if k == 0:
                    logs["objectness"] = obj.detach()
        sd, t_logits = L.query_distillation(torch.cat([preds[0]["logits"] for preds, _, _ in views]),
                                            [t for _, ts, _ in views for t in ts],
                                            [q for _, _, m in views for q in m[0]], ctx.state.center,
                                            lc.teacher_temp, lc.student_temp, lc.distill_reduction)
        total = total + lc.distill * sd
        self._center_logits = t_logits
        logs.update(distill=sd.detach(), pairs=n_local,
                    targets=torch.tensor(float(sum(len(t.masks) for t in tg)) / B, device=xl.device))
        return {"loss": total, **logs}

    def after_backward(self, model, ctx: StepContext):
        from labelwise.modeling.heads.dino import cancel_last_layer_gradients

        cancel_last_layer_gradients(ctx.module.head, ctx.epoch, ctx.cfg.loss.freeze_last_layer_epochs)

    def after_optimizer_step(self, model, ctx: StepContext):
        from labelwise.blocks.self_distill import update_center

        if self._center_logits is not None:  # DINO centring: EMA of the matched teacher codes, all ranks
            update_center(ctx.state.center, self._center_logits, ctx.cfg.loss.center_momentum)
        self._center_logits = None

    # ------------------------------------------------------------------ inference
    def inference_model(self, model, teacher, state, cfg=None):
        # the final teacher (EMA) with its decoder, as the paper infers; infer.model=student: the student
        if teacher is None or (cfg is not None and cfg.infer.model == "student"):
            return model
        return getattr(teacher, "module", teacher)

    def inference_transform(self, cfg, info):
        return _InferTransform(cfg.infer.size or cfg.oap.global_size)

    def writer_options(self, cfg, what):
        # --what pseudo: k-means of OAP's key-space Eq. 6 features into K = model.out_dim clusters
        # (as `labelwise pseudo-masks oap --clusters K`), the raw counterpart of the DINO codes
        if what != "pseudo":
            return {}
        from labelwise.pseudo.runner import _cluster_merge

        k = cfg.model.out_dim
        return {"name": "pseudo", "clusters": k, "merge": _cluster_merge(k, cfg.train.seed)}

    def _initial_teacher(self, ctx: PredictContext) -> OAPNet:
        """The teacher at step 0 for ``infer.teacher=initial``: the pretrained encoder (all that OAP
        reads), decoder and head as built (their random values do not touch the masks)."""
        if self._initial is None:
            self._initial = self.build_model(ctx.cfg, ctx.info, pretrained=True).to(ctx.device).eval()
        return self._initial

    def predict_pseudo(self, model, batch, ctx: PredictContext) -> list[list[dict]]:
        """``--what pseudo``: the teacher's OAP pseudo-masks of each image (what training matches the
        student to, every mask of both levels), upsampled from the key grid to image size (bilinear,
        > 0.5), OAP's score; ``category_id`` = k-means cluster (K = ``model.out_dim``) of OAP's
        key-space Eq. 6 features over the whole split (``ClusteredMasksWriter``), and the semantic
        masks painted into ``PRED/pseudo_clusters/<image_id>.png``."""
        import torch.nn.functional as F

        from labelwise.masks import encode_masks
        from labelwise.pseudo.common import _bboxes, encode_embedding

        teacher = self._initial_teacher(ctx) if ctx.cfg.infer.teacher == "initial" else model
        tg = teacher_targets(teacher, batch["inputs"], self.pooling(ctx.cfg), levels=("semantic", "instance"))
        res = []
        for b, item in enumerate(batch["items"]):
            H, W = item["image"].shape[:2]
            t = tg[b]
            masks = (F.interpolate(t.masks[None].float(), size=(H, W), mode="bilinear", align_corners=False)[0]
                     > 0.5).cpu().numpy()
            keep = np.nonzero(masks.reshape(len(masks), -1).any(1))[0]
            ms = masks[keep]
            sc, lv, fe = t.scores.cpu().numpy(), t.level.cpu().numpy(), t.features.cpu()
            res.append([{"category_id": 1, "segmentation": rle, "score": round(float(sc[k]), 6),
                         "bbox": [float(v) for v in box], "area": int(m.sum()),
                         "level": "semantic" if lv[k] == 0 else "instance", "embedding": encode_embedding(fe[k])}
                        for k, m, rle, box in zip(keep.tolist(), ms, encode_masks(ms), _bboxes(ms))])
        return res

    def predict(self, model, batch, ctx: PredictContext):
        if "universal" not in ctx.what:
            return [{"pseudo": p} for p in self.predict_pseudo(model, batch, ctx)]
        res = self.predict_universal(model, batch, ctx)
        if "pseudo" in ctx.what:
            for r, p in zip(res, self.predict_pseudo(model, batch, ctx)):
                r["pseudo"] = p
        return res

    def predict_universal(self, model, batch, ctx: PredictContext):
        """Universal masks: every query's mask (sigmoid > 0.5 at image size), scored by its mean
        probability inside the mask (Mask2Former's mask score), with cluster id = argmax of its
        DINO code over K; semantic queries -> ``level`` semantic, instance queries -> instance.
        The cluster map paints the semantic masks in ascending score (best on top)."""
        import torch.nn.functional as F

        from labelwise.masks import encode_masks
        from labelwise.pseudo.common import _bboxes

        ic = ctx.cfg.infer
        K = ctx.cfg.model.out_dim
        x, items = batch["inputs"], batch["items"]
        out = model(x)
        level = out["level"].cpu().numpy()
        clusters = out["logits"].float().argmax(-1).cpu().numpy()
        obj = out["pred_logits"].float().softmax(-1)[..., 0] if "pred_logits" in out else None
        res = []
        for b, item in enumerate(items):
            H, W = item["image"].shape[:2]
            prob = torch.sigmoid(F.interpolate(out["pred_masks"][b:b + 1].float(), size=(H, W), mode="bilinear",
                                               align_corners=False)[0])
            masks = prob > 0.5
            area = masks.flatten(1).sum(1)
            score = (prob * masks).flatten(1).sum(1) / area.clamp(min=1)
            if obj is not None:  # Mask2Former: class probability x mask score
                score = score * obj[b]
            keep = ((area > 0) & (score >= ic.score_threshold)).cpu().numpy()
            idx = np.nonzero(keep)[0]
            ms = masks[torch.as_tensor(idx, device=masks.device)].cpu().numpy() if len(idx) else \
                np.zeros((0, H, W), bool)
            sc = score.cpu().numpy()
            records = []
            if len(idx):
                for k, rle, box in zip(idx.tolist(), encode_masks(ms), _bboxes(ms)):
                    records.append({"category_id": int(clusters[b, k]) + 1, "segmentation": rle,
                                    "score": round(float(sc[k]), 6), "bbox": [float(v) for v in box],
                                    "area": int(area[k]), "level": "semantic" if level[k] == 0 else "instance"})
            cmap = np.full((H, W), -1, np.int64)  # 8-bit PNG for K <= 255, 16-bit above (io.write_cluster_map)
            sem = [i for i, k in enumerate(idx.tolist()) if level[k] == 0]
            for i in sorted(sem, key=lambda i: sc[idx[i]]):
                cmap[ms[i]] = clusters[b, idx[i]]
            res.append({"universal": {"masks": records, "clusters": cmap, "num_clusters": K}})
        return res
