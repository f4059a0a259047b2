"""How well a trained model reproduces a set of pseudo-masks: the pseudo-masks (a COCO results json,
e.g. ``labelwise infer RUN --what pseudo``) become the ground truth of a temporary COCO dataset over
the same images, and the model's masks (``--what universal``) are scored against them:
class-agnostic AP / AP50 / AR100 of the instance level.

    python bench/oap_fit_to_targets.py runs/oap/testbed PRED/pseudo.json PRED/universal.json [--split val]

A low score against the model's own teacher says the student does not fit its targets; a high
one with a low score against the ground truth says the targets are what limits it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def score_against_pseudo_masks(testbed: Path, pseudo: Path, pred: Path, split: str = "val") -> dict:
    from labelwise.evaluation import evaluate
    from labelwise.library import coco_dataset

    images = testbed / "images" / split
    if not images.is_dir():
        raise SystemExit(f"{images}: not found; pass a COCO-layout dataset folder (annotations/, images/{split}/)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "annotations").mkdir()
        (tmp / "images").mkdir()
        (tmp / "images" / split).symlink_to(images.resolve())
        if (testbed / "meta.json").is_file():
            shutil.copy(testbed / "meta.json", tmp / "meta.json")
        rows = [r for r in json.loads(pseudo.read_text()) if r.get("level", "instance") == "instance"]
        (tmp / "targets.json").write_text(json.dumps(rows))
        coco_dataset(tmp / "targets.json", tmp / "annotations" / f"instances_{split}.json")
        n_images = len(json.loads((tmp / "annotations" / f"instances_{split}.json").read_text())["images"])
        scores = evaluate("instance", pred, f"coco:{tmp}", split, progress=False)
    return {"targets_per_image": len(rows) / max(n_images, 1),
            **{k: float(scores[k]) for k in ("ap", "ap50", "ar100")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path, help="the COCO-layout dataset folder the predictions were made on")
    ap.add_argument("pseudo", type=Path, help="the pseudo-masks taken as ground truth (COCO results json)")
    ap.add_argument("pred", type=Path, help="the model's masks (COCO results json)")
    ap.add_argument("--split", default="val")
    a = ap.parse_args(argv)
    print(json.dumps(score_against_pseudo_masks(a.dataset, a.pseudo, a.pred, a.split)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
