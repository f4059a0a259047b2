"""Analysis only: how often SeCo's crop tags, made from a trained run's CAMs, agree with the tags
the ground truth would give the same crops (the same phi rule). Nothing is trained or chosen
with it.

    python bench/seco_diagnostics/tag_agreement.py RUN_DIR TESTBED [--images 96] [--cam aux|final]
        [--checkpoint RUN_DIR/checkpoints/step_00000060.pt]

Prints the fraction of crops (tagged by both, not uncertain) whose tags agree, and the fraction of
class-tagged crops that the ground truth calls background.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("testbed", help="VOC-layout folder of the run's training data")
    p.add_argument("--images", type=int, default=96, help="training images to look at (default 96)")
    p.add_argument("--cam", choices=("aux", "final"), default="final", help="CAM the tags come from")
    p.add_argument("--checkpoint", default=None, help="a checkpoint of the run (default: its last)")
    args = p.parse_args()

    from labelwise.data import build_dataset
    from labelwise.engine import api
    from labelwise.methods.seco import decompose as D
    from labelwise.methods.seco.method import online_cams

    run = api.load_run(args.run, device="cpu", checkpoint=args.checkpoint)
    net, sc = run.model, run.cfg.seco
    ds = build_dataset(f"voc:{args.testbed}", "train")
    torch.manual_seed(0)  # the crop positions; a script of its own, not library code
    agree = total = bg_as_fg = fg_total = 0
    for start in range(0, min(args.images, len(ds)), 8):
        items = [ds[i] for i in range(start, min(start + 8, args.images, len(ds)))]
        x = torch.stack([torch.from_numpy(it["image"]).permute(2, 0, 1).float() / 255 for it in items])
        tags = torch.stack([torch.from_numpy(it["tags"]) for it in items]).float()
        gt = torch.stack([torch.from_numpy(it["mask"].astype(np.int64)) for it in items])
        with torch.no_grad():
            cams, aux = online_cams(net, x, sc.cam_scales, tags.shape[1], sc.cam_flip, sc.cam_norm)
        roi = D.roi_mask(cams if args.cam == "final" else aux, tags, torch.ones(gt.shape, dtype=torch.bool),
                         sc.high, sc.low)
        boxes = D.sample_crop_boxes(roi, sc.n_local, sc.local_size)
        t = D.crop_tags(roi, boxes, tags.shape[1] + 1, phi=sc.phi, fill_single_class=sc.fill_single_class)
        t_gt = D.crop_tags(gt, boxes, tags.shape[1] + 1, phi=sc.phi, fill_single_class=False)
        both = (t >= 0) & (t_gt >= 0)
        agree += int(((t == t_gt) & both).sum())
        total += int(both.sum())
        bg_as_fg += int(((t > 0) & (t_gt == 0)).sum())
        fg_total += int((t > 0).sum())
    print(f"{args.checkpoint or args.run} ({args.cam} CAM): crop tags agreeing with the ground truth's {agree}/{total} = {agree / max(total, 1):.3f}; "
          f"class tags on crops the ground truth calls background {bg_as_fg}/{fg_total} = "
          f"{bg_as_fg / max(fg_total, 1):.3f}")


if __name__ == "__main__":
    main()
