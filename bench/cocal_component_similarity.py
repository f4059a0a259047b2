"""How CoCal's training shapes the dictionary: cosine similarities of the memory-bank means.

    python bench/cocal_component_similarity.py RECIPE_OUT STAGE [STAGE ...]

e.g. ``python bench/cocal_component_similarity.py runs/cocal-ablation dict pcon ocon cocal`` after
``labelwise run cocal-ablation --out runs/cocal-ablation``. For each training stage with a
dictionary, it reads the final checkpoint's memory banks (the last S components of every class),
averages each class's unit-length entries and reports the mean cosine between

* sibling parts (two different foreground parts of the same object),
* non-sibling foreground parts (parts of different objects),
* each foreground part and its parent object (part bank mean . object bank mean).

The part -> object map comes from ``RECIPE_OUT/testbed/hierarchy.json``. Reads no ground truth
of any split; only the trained banks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from labelwise.engine.checkpoint import load_checkpoint


def bank_means(state: dict, prefix: str) -> torch.Tensor:
    """(C, D) unit-length mean of each class's valid bank entries (entries normalised first)."""
    feats, count = state[f"{prefix}.feats"].float(), state[f"{prefix}.count"]
    valid = torch.arange(feats.shape[1])[None] < count[:, None]
    mean = (F.normalize(feats, dim=-1) * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
    return F.normalize(mean, dim=-1)


def similarities(state: dict, part_to_object: torch.Tensor) -> dict[str, float]:
    parts, objects = bank_means(state, "part_bank"), bank_means(state, "object_bank")
    sim = parts @ parts.T
    fg = part_to_object > 0
    pair = fg[:, None] & fg[None]
    same = (part_to_object[:, None] == part_to_object[None]) & pair & ~torch.eye(len(fg), dtype=torch.bool)
    other = (part_to_object[:, None] != part_to_object[None]) & pair
    parent = (parts[fg] * objects[part_to_object[fg]]).sum(-1)
    return {"sibling_parts": float(sim[same].mean()), "non_sibling_parts": float(sim[other].mean()),
            "part_parent_object": float(parent.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="a cocal-ablation / cocal-mask2former recipe output folder")
    ap.add_argument("stages", nargs="+", help="training stages with a dictionary (e.g. dict pcon ocon cocal)")
    args = ap.parse_args()
    h = json.loads((args.out / "testbed" / "hierarchy.json").read_text())
    objects = [o if isinstance(o, str) else o["name"] for o in h["objects"]]
    p2o = torch.tensor([objects.index(p["object"]) for p in h["parts"]])
    print("| stage | sibling parts | non-sibling parts | part . parent object |\n|---|---|---|---|")
    for stage in args.stages:
        state = load_checkpoint(args.out / stage / "checkpoints" / "last.pt").get("state")
        if not state or "part_bank.feats" not in state:
            raise SystemExit(f"{args.out / stage}: no memory banks in the checkpoint (a run with cocal.dictionary=true "
                             "is needed)")
        s = similarities(state, p2o)
        print(f"| {stage} | {s['sibling_parts']:.3f} | {s['non_sibling_parts']:.3f} | {s['part_parent_object']:.3f} |")


if __name__ == "__main__":
    main()
