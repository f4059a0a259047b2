"""How often SeCo's contrast anchors carry the wrong category tag, before and after rectification.

Analysis only: it reads the training split's ground truth to *measure* the tags SeCo derives from
its own CAMs (Sec. 3.3); nothing is trained or chosen with it. For each run (at its last
checkpoint, or ``--checkpoint``) and the same training batches and crops (the RNG is re-seeded
per batch), one ``SeCoMethod.training_step`` with the decomposition on records:

* the tags of the views (the main crop's global tag and the local crops' tags, Sec. 3.3; the
  second global view is another crop of the image and has no aligned ground truth, so it is left
  out), and the same views' tags from the ground truth (``decompose.crop_tags`` /
  ``global_tags`` on the ground-truth map under the same augmentation, proportion threshold
  ``seco.phi``: a crop holding two classes is "mixed");
* for the anchors (views tagged with a class: the ones L_LiG pulls to that class' prototype and
  L_LiL to that class' reservoir entries), the share whose ground-truth tag is the same class,
  another class, mixed, or background;
* the same after tag rectification (Eqs. 6-7), for runs whose reservoir is filled (runs with L_LiL).

    python bench/seco_anchor_tags.py RUN [RUN ...] [--batches 8] [--out PREFIX]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seco_loss_strength import load_seco_run, write_report  # noqa: E402  (a sibling bench script)

KINDS = ("same class", "other class", "mixed", "background")


def _shares(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    """Anchors (pred > 0) split by their ground-truth tag."""
    a = pred > 0
    n = int(a.sum())
    p, g = pred[a], gt[a]
    counts = {"same class": int((g == p).sum()), "other class": int(((g > 0) & (g != p)).sum()),
              "mixed": int((g == -1).sum()), "background": int((g == 0).sum())}
    return {"anchors": n, **counts}


def measure(run_dir: Path, checkpoint: str | None, batches: int) -> dict:
    from labelwise.engine.method import StepContext
    from labelwise.methods.seco import decompose as D
    from labelwise.methods.seco import losses as L
    from labelwise.methods.seco.method import _TrainTransform

    method, cfg, info, meta, model, state, teacher, step, path = load_seco_run(run_dir, checkpoint)
    from labelwise.engine.data import SeededDataset

    ds = SeededDataset(method.load_split(cfg, meta["data"], cfg.data.train_split), _TrainTransform(cfg, carry_masks=True))
    B = cfg.train.batch_size
    K = len(info.class_names) - 1
    c = copy.deepcopy(cfg)
    c.seco.lig = c.seco.lil = True
    c.seco.rectify = bool(int(state.queue.count))
    c.loss.stage_seg = 10 ** 9  # no segmentation branch: only the tags are read
    record: dict = {}
    orig = {"crop_tags": D.crop_tags, "global_tags": D.global_tags, "sample_crop_boxes": D.sample_crop_boxes,
            "lig_pairs": L.lig_pairs}

    def wrap(mod, name):
        def f(*a, **k):
            out = orig[name](*a, **k)
            record.setdefault(name, (a, k, out))
            return out
        setattr(mod, name, f)

    totals = {"raw": {k: 0 for k in ("anchors", *KINDS)}, "rectified": {k: 0 for k in ("anchors", *KINDS)}}
    model.train()
    try:
        for mod, name in ((D, "crop_tags"), (D, "global_tags"), (D, "sample_crop_boxes"), (L, "lig_pairs")):
            wrap(mod, name)
        for b in range(batches):
            batch = method.collate([ds[(b * B + i, 1000 * b + i)] for i in range(B)])
            record.clear()
            ctx = StepContext(cfg=c, info=info, step=step, max_steps=cfg.train.max_steps, epoch=0, steps_per_epoch=1,
                              device=torch.device("cpu"), module=model, teacher=teacher, state=state)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(b)
                method.training_step(model, batch, ctx)
            method._keys = method._cls = None
            boxes = record["sample_crop_boxes"][2]
            local_raw = record["crop_tags"][2].flatten()
            g_raw = record["global_tags"][2]
            t_used = record["lig_pairs"][0][0]  # the tags L_LiG saw (rectified when the reservoir is filled)
            gt = batch["gt"].clone()
            gt[~batch["valid"]] = 255
            gt_local = orig["crop_tags"](gt, boxes, K + 1, phi=cfg.seco.phi, fill_single_class=False).flatten()
            gt_global = orig["global_tags"](gt)
            n = len(g_raw)
            pred_raw = torch.cat([g_raw, local_raw])
            pred_used = torch.cat([t_used[:n], t_used[2 * n:]])  # main crop + local crops (skip the 2nd view)
            gtt = torch.cat([gt_global, gt_local])
            for key, pred in (("raw", pred_raw), ("rectified", pred_used)):
                for k, v in _shares(pred, gtt).items():
                    totals[key][k] += v
    finally:
        for mod, name in ((D, "crop_tags"), (D, "global_tags"), (D, "sample_crop_boxes"), (L, "lig_pairs")):
            setattr(mod, name, orig[name])
    if not c.seco.rectify:
        totals["rectified"] = None
    return {"run": str(run_dir), "checkpoint": str(path), "step": step, "batches": batches, "batch_size": B,
            "phi": cfg.seco.phi, "tags": totals}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="SeCo training run folders")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (one run only; default: each run's last)")
    p.add_argument("--batches", type=int, default=8, help="training batches (default 8)")
    p.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args()
    if args.checkpoint and len(args.runs) > 1:
        raise SystemExit("--checkpoint names one file; pass one run with it")
    results = [measure(Path(r), args.checkpoint, args.batches) for r in args.runs]
    lines = ["| run | step | tags | anchors / batch | same class | other class | mixed | background |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for key in ("raw", "rectified"):
            t = r["tags"][key]
            if t is None:
                continue
            n = max(t["anchors"], 1)
            lines.append(f"| `{Path(r['run']).name}` | {r['step']} | {key} | {t['anchors'] / r['batches']:.1f} | "
                         + " | ".join(f"{t[k] / n:.2f}" for k in KINDS) + " |")
    write_report("\n".join(lines), results, args.out)


if __name__ == "__main__":
    main()
