"""``cocal``: the training step (L = lambda_kMaX L_kMaX + lambda_p_con L_p_con + lambda_o_con L_o_con +
lambda_logic L_logic, supplement Sec. 6.1), the memory banks and path-probability inference.
See the package docstring."""

from __future__ import annotations

import torch
import torch.nn as nn

from labelwise.engine.method import StepContext
from labelwise.methods.cocal.config import CoCalConfig
from labelwise.methods.kmax.method import KMaXMethod


class CoCalState(nn.Module):
    """The part memory bank B (P x S x D) and the object memory bank B~ (P~ x S x D) of historical
    dictionary components (Sec. 2.2.2), each class its own ring of S samples; checkpointed with
    the run and filled identically on every rank (``enqueue`` all-gathers)."""

    def __init__(self, num_parts: int, num_objects: int, size: int, dim: int, normalize: bool = False):
        super().__init__()
        from labelwise.blocks.class_bank import ClassMemoryBank

        # the raw components for the paper's dot product; unit vectors for cocal.similarity=cosine
        self.part_bank = ClassMemoryBank(num_parts, size, dim, normalize=normalize)
        self.object_bank = ClassMemoryBank(num_objects, size, dim, normalize=normalize)


def present_components(out: dict, batch, num_parts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """C(y) and C~(y): the dictionary components (final per-image cluster centres) of the part and
    object classes present in each training sample -> ``(part anchors (Mp, D), part classes,
    object anchors (Mo, D), object classes)``."""
    centres = out["cluster_centres"]                      # (B, P + P~, D)
    B = centres.shape[0]
    P = num_parts
    present = {}
    for level, n in (("parts", P), ("objects", centres.shape[1] - P)):
        lab = batch[level].long().flatten(1)               # (B, HW), 255 = ignore
        valid = lab < n
        counts = torch.zeros(B, n, dtype=torch.long, device=centres.device)
        present[level] = counts.scatter_add_(1, torch.where(valid, lab, 0), valid.long()) > 0
    bp, cp = present["parts"].nonzero(as_tuple=True)
    bo, co = present["objects"].nonzero(as_tuple=True)
    return centres[bp, cp], cp, centres[bo, P + co], co


class CoCalMethod(KMaXMethod):
    name = "cocal"
    config_cls = CoCalConfig
    description = "CoCal: dictionary-based object parsing with contrastive components and logical constraints"
    inference_keys = ("cocal.path_inference",)  # labelwise infer --set cocal.path_inference=false
    supports_accumulation = False  # the banks enqueue the components of the step's one forward

    def __init__(self):
        self._enqueue = None

    def uses_dictionary(self, cfg) -> bool:
        cfg.cocal.validate()
        return bool(cfg.cocal.dictionary)

    def build_state(self, cfg, info):
        if not cfg.cocal.dictionary:
            return None
        return CoCalState(len(info.part_names), len(info.class_names), cfg.cocal.bank_size, cfg.model.mask_dim,
                          normalize=cfg.cocal.similarity == "cosine")

    def training_step(self, model, batch, ctx: StepContext):
        from labelwise.blocks.dictionary_contrastive import (dictionary_contrastive_loss, logic_loss,
                                                             reverse_logic_loss)

        cc = ctx.cfg.cocal
        net = ctx.module
        out = model(batch["image"])
        kmax, logs = self.decoder_loss(net, out, batch, ctx)
        total = cc.w_kmax * kmax
        self._enqueue = None
        if cc.dictionary:
            pa, pc, oa, oc = present_components(out, batch, net.num_parts)
            k = cc.hard_negatives or None        # Eqs. 5-6: hard-negative mining (Sec. 2.2.2)
            k_logic = k if cc.logic_hard_negatives else None
            opts = dict(reduction=cc.reduction, similarity=cc.similarity)
            state = ctx.state
            if cc.p_con:    # Eq. 5
                lp = dictionary_contrastive_loss(pa, pc, *state.part_bank.get(), cc.tau, k, **opts)
                total = total + cc.w_p_con * lp
                logs["p_con"] = lp.detach()
            if cc.o_con:    # Eq. 6
                lo = dictionary_contrastive_loss(oa, oc, *state.object_bank.get(), cc.tau, k, **opts)
                total = total + cc.w_o_con * lo
                logs["o_con"] = lo.detach()
            if cc.logic_loss or cc.logic_reverse:
                p2o = torch.as_tensor(ctx.info.part_to_object, device=pa.device)
            if cc.logic_loss:    # Eq. 7
                ll = logic_loss(pa, pc, p2o, *state.object_bank.get(), cc.tau, k_logic, **opts)
                total = total + cc.w_logic * ll
                logs["logic"] = ll.detach()
            if cc.logic_reverse:    # Fig. 1's "vice versa" (no equation in the paper)
                lr = reverse_logic_loss(oa, oc, p2o, *state.part_bank.get(), cc.tau, k_logic, **opts)
                total = total + cc.w_logic * lr
                logs["logic_reverse"] = lr.detach()
            # the banks store this step's components after the step (historical samples only)
            self._enqueue = (pa.detach(), pc, oa.detach(), oc)
        return {"loss": total, **logs}

    def after_optimizer_step(self, model, ctx: StepContext):
        if self._enqueue is not None and ctx.state is not None:
            pa, pc, oa, oc = self._enqueue
            ctx.state.part_bank.enqueue(pa, pc)
            ctx.state.object_bank.enqueue(oa, oc)
        self._enqueue = None

    def parse(self, part_prob, object_prob, ctx):
        """Dictionary: the nearest part / object component of every pixel; with ``cocal.path_inference``
        the best part -> object path (part probability x parent-object probability), so the two maps
        agree by construction (Sec. 2.2.3, Fig. 3)."""
        cc = ctx.cfg.cocal
        if not (cc.dictionary and cc.path_inference):
            return super().parse(part_prob, object_prob, ctx)
        from labelwise.methods.cocal.logic import path_inference

        p2o = torch.as_tensor(ctx.info.part_to_object, device=part_prob.device)
        parts, objects, _ = path_inference(part_prob, object_prob, p2o)
        return parts, objects
