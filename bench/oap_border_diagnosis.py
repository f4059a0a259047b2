"""Why do OAP's top-ranked masks touch the image border? Score components per mask on a testbed.

For every instance-level OAP mask of a COCO-layout testbed split (``labelwise data synth objects``)
this recomputes, from the same centred / L2-normalised keys OAP uses, the two terms of OAP's
``contrast`` score -- ``in`` (mean affinity between distinct tokens of the mask) and ``out``
(mean affinity of its tokens to all other tokens of the image) -- plus ``persistence``, the area,
whether the mask touches the image border and its best IoU with a ground-truth *thing* instance.
It prints (and writes with ``--json``) the means of these terms for masks that touch the border
and masks that do not, for masks that match a thing (IoU >= 0.5) and those that do not, and how
often the top-1 mask of an image touches the border, under the score rules given by ``--score``.

    python bench/oap_border_diagnosis.py --data coco:DIR --split val --json out.json \
        [--score contrast_persistence --score border_contrast_persistence]

Ground truth is read only to *describe* masks; it chooses nothing here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from labelwise.data import build_dataset
from labelwise.pseudo.common import FeatureExtractor, resolve_pseudo_config, upsample_masks
from labelwise.pseudo.oap.pooling import OnlineAgglomerativePooling, border_ring


def mask_terms(F: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """``in`` and ``out`` of OAP's contrast for token masks ``(K, N)`` of one image with keys ``F (N, D)``."""
    M = masks.float()
    n = M.sum(1)
    N = M.shape[1]
    A = F @ F.T
    MA = M @ A
    pair = (MA * M).sum(1)                       # Σ_{s,t∈i} A_st, diagonal included (A_tt = 1)
    in_ = torch.where(n > 1, (pair - n) / (n * (n - 1)).clamp(min=1), torch.ones_like(n))
    out = (MA.sum(1) - pair) / (n * (N - n)).clamp(min=1)
    return {"in": in_, "out": out}


def summarise(rows: list[dict], key: str) -> dict:
    sel = [r for r in rows if r[key]]
    rest = [r for r in rows if not r[key]]

    def means(rs):
        if not rs:
            return {}
        return {k: float(np.mean([r[k] for r in rs])) for k in ("in", "out", "contrast", "persistence",
                                                                 "area_frac", "score", "rank_frac")} | {"n": len(rs)}

    return {"yes": means(sel), "no": means(rest)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="COCO-layout testbed, e.g. coco:/tmp/objects")
    ap.add_argument("--split", default="val")
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--score", action="append", default=None,
                    help="oap.score rule(s) to rank by (default: contrast_persistence)")
    ap.add_argument("--set", nargs="*", default=[], help="extra oap.* / features.* overrides")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = build_dataset(args.data, args.split)
    ext = FeatureExtractor("efficientnet_lite0", None, args.resolution, "cpu")
    items = [ds[i] for i in range(len(ds))]
    keys = torch.cat([ext([it["image"]]) for it in items])
    report: dict = {"data": args.data, "split": args.split, "images": len(items), "rules": {}}
    for rule in args.score or ["contrast_persistence"]:
        cfg = resolve_pseudo_config("oap", [*args.set, f"oap.score={rule}"],
                                    {"features": {"backbone": "efficientnet_lite0"}}).oap
        oap = OnlineAgglomerativePooling(cfg)
        Kp, _ = oap.prepare(keys)
        h, w = keys.shape[1:3]
        ring = border_ring(h, w, keys.device).flatten()
        rows, top1_border, best_rank, aff = [], [], [], []
        for b in range(len(items)):                  # do border tokens look alike (padding)?
            A = Kp.F[b] @ Kp.F[b].T
            off = ~torch.eye(h * w, dtype=torch.bool)
            rr, ii = ring[:, None] & ring[None] & off, ~ring[:, None] & ~ring[None] & off
            aff.append([float(A[rr].mean()), float(A[ii].mean()), float(A[ring][:, ~ring].mean())])
        for b, res in enumerate(oap(keys)):
            s = res.instance
            K = len(s)
            if K == 0:
                continue
            tok = s.masks.reshape(K, -1)
            terms = mask_terms(Kp.F[b], tok)
            gt = [np.asarray(i["mask"], bool) for i in items[b]["instances"]
                  if i["category_id"] <= 4 and not i.get("iscrowd")]
            img_masks = upsample_masks(s.masks, items[b]["image"].shape[:2])
            if gt:
                g = np.stack(gt).reshape(len(gt), -1).astype(np.float32)
                m = img_masks.reshape(K, -1).astype(np.float32)
                inter = m @ g.T
                iou = inter / (m.sum(1)[:, None] + g.sum(1)[None] - inter).clip(min=1)
                best = iou.max(1)
            else:
                best = np.zeros(K)
            touches = (tok & ring).any(1)
            top1_border.append(bool(touches[0]))
            if best.max() >= 0.5:
                best_rank.append(int(np.argmax(best >= 0.5)) + 1)   # first (best-ranked) matching mask
            for k in range(K):
                rows.append({"in": float(terms["in"][k]), "out": float(terms["out"][k]),
                             "contrast": float(terms["in"][k] - terms["out"][k]),
                             "persistence": float(s.persistence[k]) / len(cfg.thresholds),
                             "area_frac": float(s.areas[k]) / (h * w), "score": float(s.scores[k]),
                             "rank_frac": k / max(K - 1, 1), "border": bool(touches[k]),
                             "object": bool(best[k] >= 0.5)})
        report["rules"][rule] = {
            "masks": len(rows),
            "affinity_ring_ring_interior_interior_ring_interior": np.mean(aff, 0).round(4).tolist(),
            "top1_touches_border": float(np.mean(top1_border)),
            "share_touching_border": float(np.mean([r["border"] for r in rows])),
            "objects_touching_border": float(np.mean([r["border"] for r in rows if r["object"]] or [0])),
            "first_object_rank_mean": float(np.mean(best_rank)) if best_rank else None,
            "by_border": summarise(rows, "border"), "by_object": summarise(rows, "object")}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
