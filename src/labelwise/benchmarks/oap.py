"""``labelwise bench oap``: OAP vs MaskCut / TokenCut — ms per image, supernodes per layer,
class-agnostic instance AP.

Protocol (one run; every method gets the same features of the same images):

* **Data**: an ``objects`` testbed generated in a temp folder (``--train`` / ``--val`` images
  of ``--size`` px, ``--seed``) or ``--data coco:ROOT``; ``--quality-split`` (default ``val``)
  is the split scored and timed. Choose OAP settings (e.g. ``--set oap.score=...``) with
  ``--quality-split train``, never on ``val``.
* **Features**: the backbone's last feature map (default EfficientNet-Lite0, shipped ImageNet
  weights) at *native* grids only: a ``g x g`` grid is the input at ``g * stride`` px (stride
  probed from the backbone: 32 here, so 28x28 = 896 px and 56x56 = 1792 px). Extracted once
  per grid (``features`` row: ms per image at all cores, not part of any ratio).
* **Content cases** (``--content``): ``smooth`` = the testbed features as they are; ``rough`` =
  the same features plus Gaussian noise of ``--rough-noise`` x the RMS of the per-image
  centred features (SNR = 1 / noise², 0 dB at 1.0) — the ``objects`` images and real photos
  (``--photos``, from ``skimage.data``) leave only tens of supernodes after OAP's layer 0,
  which makes OAP's later layers free, so the rough case is the stress case; ``photo`` = the
  ``skimage.data`` photos. Supernode counts after every layer (``impl.last_stats``) are recorded
  for every case timed and always for the photos (``nodes``).
* **Threads** (``--threads 1,all``): every figure is taken inside :func:`pinned_threads` —
  ``threadpoolctl.threadpool_limits`` (OpenBLAS / MKL / OpenMP of numpy, scipy and torch) *and*
  ``torch.set_num_threads``, restored afterwards. Process CPU time is recorded next to wall
  time: ``cpu_per_wall`` <= threads (+ a little) shows that the pinning held.
* **Speed**: the token-level algorithm only (features given, batch 1, masks on the token grid).
  Variants: ``oap``; ``maskcut`` = MaskCut as released (dense generalised ``eigh``, 3 rounds),
  without the CRF (``maskcut.crf=false``: the CRF is image-resolution post-processing, timed
  nowhere); ``maskcut_lanczos``; ``tokencut`` (dense) and ``tokencut_lanczos``. For each
  (content, grid, threads) every variant makes one untimed warm-up call on the first image, then
  ``--passes`` passes over the same ``--speed-images`` images; the passes are interleaved across
  variants (the order rotates each pass) so that load drift on a shared machine hits all of them
  alike. Reported: the median per-image time over all timed calls and its spread (min, max);
  ``x_oap_*`` = variant median / OAP median (same content, grid, threads).
* **End to end** (``--no-e2e`` skips it): what a user of ``labelwise pseudo-masks`` waits for per image,
  for every speed variant at every timed grid and thread count, on the same ``--speed-images`` images (the
  image files of the split, i.e. the ``smooth`` content) and ``--passes``, inside the same
  :func:`pinned_threads` and through the same warm-up / interleaving (:func:`time_variants`). One call is
  the command's per-image path, batch 1, under ``torch.inference_mode`` as in ``run_predict``:
  ``decode`` = ``read_image`` of the file on disk + the command's resize to the backbone input
  (``runner._Resize``, the DataLoader side: in the command it runs in ``features.num_workers`` worker
  processes, here inline); ``features`` = ``FeatureExtractor.features`` at the speed rows' ``g * stride`` px;
  ``generator`` = the method (``build_method``); ``post`` = :func:`labelwise.pseudo.runner.image_records`
  (the written levels, ``upsample_masks`` to the image size, the method's ``postprocess`` -- MaskCut's hole
  filling, and the CRF on the ``maskcut_crf`` row -- ``mask_records`` = COCO RLE + box + embedding) and the
  ``CocoRLEWriter`` shard line (buffered write; the command's per-batch ``fsync`` is left out). The total
  of a call is the sum of its parts; reported: the median total [min, max], the parts of the median call
  (so they add up to it) and each part's own median [min, max]; ``x_oap_e2e_*`` = variant / OAP, same run.
  ``maskcut_crf`` (when pydensecrf2 is installed; ``labelwise pseudo-masks maskcut`` runs the CRF then by
  default) shares the decode, features and cut of each ``maskcut`` call and adds the released CRF in its
  own post-processing, as the quality rows do.
* **Quality** (``--quality-grids``, all cores): class-agnostic mask AP50 / AP / AR100 against the
  thing instances (pycocotools via ``labelwise.evaluation``) on every image of the split. OAP:
  instance-level masks, phi = ``--min-area-frac`` of the grid (``oap.min_area_frac``); MaskCut as
  released without CRF (hole filling kept) and, when pydensecrf2 is installed, ``maskcut_crf``
  (the released CRF); TokenCut dense. Token masks are upsampled with ``upsample_masks``.
  ``oracle``: the ground-truth thing masks snapped to the token grid (average pooling,
  fraction > 0.5), upsampled the same way, score 1 — the best a token grid allows.
  ``*_gtfeat`` rows: features made from the ground truth at ``--gt-grid`` — each region (thing
  instance or stuff/background region; per token the majority id) gets a random unit prototype
  (``--gt-dim``, seeded) plus Gaussian noise of norm ~``--gt-noise``; OAP, MaskCut, TokenCut run
  on them (a test of the grouping algorithm with known regions).
* ``--device cuda``: additionally OAP on the GPU (``oap_gpu``): a batch of ``--gpu-batch`` images
  at the largest grid, masks left on the GPU, ``torch.cuda.synchronize`` around each call, one
  warm-up, median over ``--passes`` calls, ms per image, backbone excluded. MaskCut/TokenCut have
  no GPU path: they stay on the CPU. The end-to-end rows then run the features and OAP on the GPU
  (synchronised after each), as ``labelwise pseudo-masks --device cuda`` does.

Result: ``{"<variant>": {"ms_per_image": float, ...}}``; see :func:`run` for the keys, and
``--md`` writes the markdown tables of ``bench/README.md`` (:func:`markdown`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn

DEFAULT_MIN_AREA_FRAC = 5 / 784
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
CONTENTS = ("smooth", "rough", "photo")

# variant -> (method, the overrides that define it; they win over --set)
SPEED_VARIANTS = {
    "oap": ("oap", []),
    "maskcut": ("maskcut", ["maskcut.solver=dense", "maskcut.crf=false"]),
    "maskcut_lanczos": ("maskcut", ["maskcut.solver=lanczos", "maskcut.crf=false"]),
    "tokencut": ("tokencut", ["tokencut.solver=dense"]),
    "tokencut_lanczos": ("tokencut", ["tokencut.solver=lanczos"]),
}
# the ground-truth-feature rows use the released DINO settings (no centring, MaskCut tau 0.15, TokenCut 0.2):
# the prototypes are already zero-mean in expectation; centring would make distinct regions look alike
GT_OVERRIDES = ["oap.center_features=false", "maskcut.center=false", "maskcut.tau=0.15", "tokencut.center=false",
                "tokencut.tau=0.2"]
# rows of the end-to-end table (maskcut_crf: with pydensecrf2 only)
E2E_ROWS = ("oap", "maskcut", "maskcut_crf", "maskcut_lanczos", "tokencut", "tokencut_lanczos")
QUALITY_VARIANTS = {
    "oap": ("oap", []),
    "maskcut": ("maskcut", ["maskcut.solver=dense", "maskcut.crf=false"]),
    "maskcut_crf": ("maskcut", ["maskcut.solver=dense", "maskcut.crf=true"]),
    "tokencut": ("tokencut", ["tokencut.solver=dense"]),
}


# --------------------------------------------------------------------------- arguments
def _fraction(text: str) -> float:
    try:
        v = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number or a fraction such as 5/784") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 1)")
    return v


def _int_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers such as 28,56") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--data", default=None, metavar="coco:ROOT",
      help="COCO-layout data to score and time (default: generate the objects testbed)")
    a("--quality-split", default="val", metavar="SPLIT",
      help="split that is timed and scored (default val; tune OAP settings on train, never on val)")
    a("--train", type=int, default=24, metavar="N", help="generated train images (default 24)")
    a("--val", type=int, default=8, metavar="N",
      help="generated val images, all scored (default 8; 24 gives tighter AP at ~4 min more on 2 cores)")
    a("--max-images", type=int, default=None, metavar="N", help="score only the first N images of the split")
    a("--size", type=int, default=224, help="generated image size in px (default 224)")
    a("--seed", type=int, default=0, help="seed of the testbed, the rough noise and the GT prototypes (default 0)")
    a("--backbone", default="efficientnet_lite0", help="feature backbone (default efficientnet_lite0)")
    a("--weights", default=None, metavar="PATH", help="backbone checkpoint")
    a("--grids", type=_int_list, default=[28, 56], metavar="G,G",
      help="native token grids timed (default 28,56: 896 / 1792 px inputs at stride 32)")
    a("--quality-grids", type=_int_list, default=[28, 56], metavar="G,G",
      help="native token grids scored (default 28,56)")
    a("--threads", default="1,all", metavar="N,all",
      help="thread counts timed, torch and BLAS pinned together (default 1,all; all = this process's cores)")
    a("--passes", type=int, default=3, metavar="N", help="timed passes over the speed images, every variant (default 3)")
    a("--speed-images", type=int, default=3, metavar="N", help="images timed, every variant (default 3)")
    a("--content", default="smooth,rough", metavar="A,B",
      help="content cases timed: smooth (testbed features), rough (+ Gaussian noise), photo (skimage photos); "
           "default smooth,rough")
    a("--rough-noise", type=float, default=1.0, metavar="REL",
      help="noise std of the rough case relative to the RMS of the centred features (default 1.0 = 0 dB SNR)")
    a("--photos", default=",".join(PHOTOS), metavar="A,B",
      help=f"skimage.data photos for the photo case / node counts (default {','.join(PHOTOS)}; '' = none)")
    a("--min-area-frac", type=_fraction, default=DEFAULT_MIN_AREA_FRAC, metavar="FRAC",
      help="OAP phi as a fraction of the token grid (oap.min_area_frac; default 5/784 = 5 tokens at 28x28, "
           "20 at 56x56)")
    a("--gt-grid", type=int, default=28, metavar="G", help="grid of the ground-truth-feature rows (default 28)")
    a("--gt-dim", type=int, default=64, metavar="D", help="dimension of the ground-truth prototypes (default 64)")
    a("--gt-noise", type=float, default=0.5, metavar="REL",
      help="noise norm relative to the unit prototypes of the ground-truth features (default 0.5)")
    a("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="dotted pseudo-mask config override for every method, repeatable (e.g. --set oap.score=persistence); "
           "the variant-defining keys (solver, crf) win")
    a("--device", default="cpu",
      help="cpu (default) or cuda: cuda extracts features there and adds oap_gpu (MaskCut/TokenCut stay on the CPU; "
           "the end-to-end rows run features and OAP there, as pseudo-masks --device cuda does)")
    a("--gpu-batch", type=int, default=16, metavar="B", help="images per OAP call for oap_gpu (default 16)")
    a("--md", default=None, metavar="OUT.md", help="also write the markdown tables here")
    a("--no-speed", action="store_true", help="skip the CPU speed part")
    a("--no-quality", action="store_true", help="skip the AP part (oracle and ground-truth-feature rows too)")
    a("--no-e2e", action="store_true",
      help="skip the end-to-end rows (decode + features + generator + masks/RLE per image, every speed variant "
           "at every grid and thread count: roughly doubles the speed part's time)")


# --------------------------------------------------------------------------- threads
def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_threads(spec: str) -> list[int]:
    """``"1,all"`` -> ``[1, cores]`` (deduplicated, in order)."""
    out: list[int] = []
    for t in str(spec).split(","):
        t = t.strip().lower()
        if not t:
            continue
        n = num_cores() if t == "all" else int(t)
        if n < 1:
            raise ValueError(f"--threads {spec!r}: thread counts must be >= 1")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"--threads {spec!r}: give at least one thread count")
    return out


@contextlib.contextmanager
def pinned_threads(n: int):
    """Limit torch (``set_num_threads``) *and* every native thread pool threadpoolctl knows (OpenBLAS,
    MKL, OpenMP of numpy/scipy/torch) to ``n`` threads; restore both afterwards."""
    from threadpoolctl import threadpool_limits

    prev = torch.get_num_threads()
    with threadpool_limits(limits=int(n)):
        torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(prev)


# --------------------------------------------------------------------------- pieces
def snap_masks(masks: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """Image masks ``(K, H, W)`` -> token masks ``(K, grid, grid)``: a token is in the mask when more than
    half of its pixels are (average pooling over the token's cell)."""
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    if m.shape[0] == 0:
        return torch.zeros((0, grid, grid), dtype=torch.bool)
    return Fn.adaptive_avg_pool2d(m[:, None], (grid, grid))[:, 0] > 0.5


def token_majority(ids: np.ndarray, grid: int) -> torch.Tensor:
    """Region-id map ``(H, W)`` -> ``(grid, grid)`` map of each token's most frequent id."""
    uniq, inv = np.unique(ids, return_inverse=True)
    onehot = Fn.one_hot(torch.from_numpy(inv.reshape(ids.shape)).long(), len(uniq)).permute(2, 0, 1).float()
    frac = Fn.adaptive_avg_pool2d(onehot[None], (grid, grid))[0]
    return torch.from_numpy(uniq)[frac.argmax(0)]


def gt_features(token_ids: torch.Tensor, dim: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Ground-truth features ``(h, w, dim)``: one random unit prototype per region id present, plus Gaussian
    noise whose norm is about ``noise`` (per-coordinate std ``noise / sqrt(dim)``)."""
    uniq, inv = torch.unique(token_ids, return_inverse=True)
    protos = Fn.normalize(torch.randn(len(uniq), dim, generator=generator), dim=-1)
    f = protos[inv]
    if noise > 0:
        f = f + noise / dim ** 0.5 * torch.randn(f.shape, generator=generator)
    return f


def add_noise(keys: torch.Tensor, rel: float, generator: torch.Generator) -> torch.Tensor:
    """``keys (B, h, w, D)`` + Gaussian noise of std ``rel`` x the RMS of each image's centred features."""
    x = keys.float()
    rms = (x - x.mean((1, 2), keepdim=True)).pow(2).mean((1, 2, 3), keepdim=True).sqrt()
    return x + rel * rms * torch.randn(x.shape, generator=generator)


def _progress_bar(total: int, desc: str):
    from labelwise.utils import progress

    return progress(None, desc=desc, total=total, leave=False)


def _log(msg: str) -> None:
    if os.environ.get("LABELWISE_NO_PROGRESS") != "1":
        print(f"[bench oap] {msg}", file=sys.stderr, flush=True)


def time_variants(runs: dict, items: list[torch.Tensor], passes: int, bar=None, on_call=None) -> dict:
    """One untimed warm-up call per variant on ``items[0]``, then ``passes`` passes over all ``items``,
    interleaved across variants (the order rotates by one each pass). Per variant: the wall and process
    CPU seconds of every timed call. ``on_call(name, pass, index)`` runs after each timed call, outside the
    timed window."""
    names = list(runs)
    for name in names:
        runs[name](items[0])
        if bar is not None:
            bar.update(1)
    out = {name: {"wall": [], "cpu": []} for name in names}
    for p in range(passes):
        k = p % len(names)
        for name in names[k:] + names[:k]:
            fn = runs[name]
            gc.collect()
            for i, it in enumerate(items):
                c0, t0 = time.process_time(), time.perf_counter()
                fn(it)
                t1, c1 = time.perf_counter(), time.process_time()
                out[name]["wall"].append(t1 - t0)
                out[name]["cpu"].append(c1 - c0)
                if on_call is not None:
                    on_call(name, p, i)
                if bar is not None:
                    bar.update(1)
    return out


def _summary(t: dict, threads: int, images: int, passes: int) -> dict:
    w = [1000.0 * s for s in t["wall"]]
    c = [1000.0 * s for s in t["cpu"]]
    return {"median_ms": statistics.median(w), "min_ms": min(w), "max_ms": max(w),
            "cpu_median_ms": statistics.median(c), "cpu_per_wall": sum(c) / max(sum(w), 1e-12),
            "threads": threads, "images": images, "passes": passes, "calls": len(w)}


E2E_PARTS = ("decode", "features", "generator", "post")


def e2e_call(path: str | Path, file_name: str, fe, run, levels, posts: dict, writers: dict) -> dict:
    """One image through the per-image path of ``labelwise pseudo-masks`` (its own functions, batch 1):
    decode + resize (the DataLoader side), features, the generator ``run``, then per row of ``posts``
    (``{row: postprocess or None}``) :func:`~labelwise.pseudo.runner.image_records` and the row's
    ``CocoRLEWriter`` line. Returns ``{row: {part: seconds, "masks": records written}}``: the rows share
    the decode, features and generator of this call; each row's ``post`` is its own."""
    from labelwise.io import read_image
    from labelwise.pseudo.runner import _Resize, image_records

    cuda = fe.device.type == "cuda"
    with torch.inference_mode():                                   # as run_predict
        t0 = time.perf_counter()
        image = read_image(path)
        item = _Resize(fe.resolution)({"image": image, "image_id": file_name, "file_name": file_name})
        t1 = time.perf_counter()
        keys = fe.features(item["input"][None].to(fe.device))
        if cuda:
            torch.cuda.synchronize(fe.device)
        t2 = time.perf_counter()
        pm = run(keys)[0]
        if cuda:
            torch.cuda.synchronize(fe.device)
        t3 = time.perf_counter()
        out, tp = {}, t3
        for row, post in posts.items():
            recs = image_records(pm, item["image"], levels, post)
            writers[row].write(item, recs)
            t4 = time.perf_counter()
            out[row] = {"decode": t1 - t0, "features": t2 - t1, "generator": t3 - t2, "post": t4 - tp,
                        "masks": len(recs)}
            tp = t4
    return out


def _e2e_summary(calls: list[dict], cpu: list[float], wall: list[float], threads: int, images: int,
                 passes: int) -> dict:
    """Per-call parts (seconds) -> ``median_ms`` [``min_ms``, ``max_ms``] of the totals, ``parts_ms`` = the
    parts of the median call (the mean of the two middle calls for an even count, as ``statistics.median``),
    which add up to ``median_ms``, and ``parts`` = each part's own median / min / max."""
    tot = [sum(c[p] for p in E2E_PARTS) for c in calls]
    order = sorted(range(len(tot)), key=tot.__getitem__)
    mid = order[(len(order) - 1) // 2: len(order) // 2 + 1]
    return {"median_ms": 1000.0 * statistics.median(tot), "min_ms": 1000.0 * min(tot), "max_ms": 1000.0 * max(tot),
            "parts_ms": {p: 1000.0 * statistics.fmean(calls[i][p] for i in mid) for p in E2E_PARTS},
            "parts": {p: {"median_ms": 1000.0 * statistics.median(c[p] for c in calls),
                          "min_ms": 1000.0 * min(c[p] for c in calls), "max_ms": 1000.0 * max(c[p] for c in calls)}
                      for p in E2E_PARTS},
            "masks_per_image": statistics.fmean(c["masks"] for c in calls),
            "cpu_per_wall": sum(cpu) / max(sum(wall), 1e-12),
            "threads": threads, "images": images, "passes": passes, "calls": len(calls)}


def _node_summary(stats: list[dict], per_image_tokens: int) -> dict:
    """``last_stats`` of batch-1 calls (one per image) -> mean per layer and the per-image lists."""
    inst = [s["instance_nodes"] for s in stats]
    sem = [s["semantic_nodes"] for s in stats]

    def mean(rows):
        return [round(float(np.mean(col)), 1) for col in zip(*rows)] if rows and rows[0] else []

    return {"tokens": per_image_tokens, "instance_nodes": mean(inst), "semantic_nodes": mean(sem),
            "instance_nodes_per_image": inst, "semantic_nodes_per_image": sem}


# --------------------------------------------------------------------------- data
def _dataset(args, tmp: Path) -> tuple[Path, str, list[dict], dict]:
    """(root, split, images [{id, file_name, height, width, path}], annotations by image id with 'isthing')."""
    from labelwise.data.coco import resolve_coco_paths
    from labelwise.errors import LabelwiseError

    split = args.quality_split
    if args.data:
        if not str(args.data).startswith("coco:"):
            raise LabelwiseError(f"--data {args.data}: bench oap needs a coco:ROOT dataset")
        root = Path(str(args.data)[5:])
    else:
        from labelwise.data.synth import generate

        if split not in ("train", "val"):
            raise LabelwiseError(f"--quality-split {split}: the generated testbed has train and val")
        root = tmp / "objects"
        prev = os.environ.get("LABELWISE_NO_PROGRESS")
        os.environ["LABELWISE_NO_PROGRESS"] = "1"
        try:
            generate("objects", root, n_train=max(1, args.train), n_val=max(1, args.val), size=args.size,
                     seed=args.seed)
        finally:
            if prev is None:
                os.environ.pop("LABELWISE_NO_PROGRESS", None)
            else:
                os.environ["LABELWISE_NO_PROGRESS"] = prev
    ann_file, img_dir, _, name = resolve_coco_paths(root, split)
    data = json.loads(Path(ann_file).read_text())
    thing = {int(c["id"]): bool(c.get("isthing", 1)) for c in data["categories"]}
    images = sorted(data["images"], key=lambda im: im["id"])
    if args.max_images:
        images = images[:args.max_images]
    for im in images:
        im["path"] = img_dir / im["file_name"]
    anns: dict[int, list[dict]] = {int(im["id"]): [] for im in images}
    for a in data["annotations"]:
        if int(a["image_id"]) in anns:
            anns[int(a["image_id"])].append({**a, "isthing": thing.get(int(a["category_id"]), True)})
    return root, name, images, anns


def _gt_masks(anns: list[dict], h: int, w: int, things_only: bool = True) -> np.ndarray:
    from labelwise.masks import decode_mask

    sel = [a for a in anns if a["isthing"] and not a.get("iscrowd", 0)] if things_only else anns
    if not sel:
        return np.zeros((0, h, w), bool)
    return np.stack([decode_mask(a["segmentation"], h, w) for a in sel])


def region_ids(anns: list[dict], h: int, w: int) -> np.ndarray:
    """``(H, W)`` region ids: 0 = unannotated background, then every stuff region, then every thing
    instance painted on top (annotation order)."""
    from labelwise.masks import decode_mask

    ids = np.zeros((h, w), np.int64)
    order = [a for a in anns if not a["isthing"]] + [a for a in anns if a["isthing"]]
    for k, a in enumerate(order, 1):
        ids[decode_mask(a["segmentation"], h, w)] = k
    return ids


def _native_stride(fe) -> int:
    probe = 256
    with torch.no_grad():
        k = fe.features(torch.zeros(1, 3, probe, probe))
    return max(1, round(probe / int(k.shape[1])))


# --------------------------------------------------------------------------- quality
def _score(name: str, preds: list[dict], root: Path, split: str, tmp: Path) -> dict:
    from labelwise.evaluation import evaluate

    pred = tmp / f"{name}.json"
    pred.write_text(json.dumps(preds))
    ev = evaluate("instance", str(pred), f"coco:{root}", split, progress=False)
    return {"ap50": float(ev["ap50"]), "ap": float(ev["ap"]), "ar100": float(ev["ar100"])}


def _predict(fn, keys: torch.Tensor, images: list[dict], arrays: list[np.ndarray], post_impls: dict) -> dict:
    """Instance masks of ``fn`` on every image -> {row name: COCO records}; ``post_impls`` maps a row name to
    an implementation whose ``postprocess`` (MaskCut: hole filling, CRF) runs on the upsampled masks
    (None: none), so the cut runs once for MaskCut with and without CRF."""
    from labelwise.pseudo.common import mask_records, upsample_masks
    from labelwise.pseudo.runner import _subset

    rows: dict[str, list[dict]] = {k: [] for k in post_impls}
    for i, (im, img) in enumerate(zip(images, arrays)):
        pm = fn(keys[i:i + 1])[0]
        sel = [k for k, lv in enumerate(pm.levels) if lv == "instance"]
        sub = _subset(pm, sel)
        for row, impl in post_impls.items():
            m = upsample_masks(sub.masks, img.shape[:2])
            post = getattr(impl, "postprocess", None) if impl is not None else None
            keep = post(img, m) if post is not None else None
            for r in mask_records(sub, m, keep):
                r.pop("embedding")
                rows[row].append({"image_id": int(im["id"]), "file_name": im["file_name"], **r})
    return rows


def _oracle_records(images, arrays, anns, grid: int) -> list[dict]:
    from labelwise.masks import encode_masks
    from labelwise.pseudo.common import (  # the record layout of mask_records
        _bboxes,
        upsample_masks,
    )

    out = []
    for im, img in zip(images, arrays):
        h, w = img.shape[:2]
        gt = _gt_masks(anns[int(im["id"])], h, w)
        m = upsample_masks(snap_masks(gt, grid), (h, w))
        m = m[m.reshape(len(m), -1).any(1)] if len(m) else m
        if not len(m):
            continue
        for rle, box, a in zip(encode_masks(m), _bboxes(m), m.reshape(len(m), -1).sum(1)):
            out.append({"image_id": int(im["id"]), "file_name": im["file_name"], "category_id": 1,
                        "segmentation": rle, "score": 1.0, "bbox": [float(v) for v in box], "area": int(a)})
    return out


# --------------------------------------------------------------------------- run
def run(args) -> dict:
    """Result keys (per variant row; ``G`` grid, ``N`` threads, ``C`` a content case other than smooth):

    * speed rows (``oap``, ``maskcut``, ``maskcut_lanczos``, ``tokencut``, ``tokencut_lanczos``):
      ``ms_per_image_G_tN`` (smooth) and ``ms_per_image_C_G_tN`` = median ms per image; ``x_oap_G_tN`` /
      ``x_oap_C_G_tN`` = that / OAP's (not on the oap row); ``ms_per_image`` = first content, largest grid,
      first thread count; ``timing`` = {"C_G_tN": {median_ms, min_ms, max_ms, cpu_median_ms, cpu_per_wall,
      threads, images, passes, calls}};
    * quality: ``ap50_G``, ``ap_G``, ``ar100_G``, ``masks_per_image_G`` on ``oap``, ``maskcut``,
      ``maskcut_crf`` (pydensecrf2 only), ``tokencut``, ``oracle`` and ``*_gtfeat`` (at ``--gt-grid``);
    * end to end (not with ``--no-e2e``; rows: the speed rows and ``maskcut_crf`` when pydensecrf2 is
      installed): ``e2e_ms_per_image_G_tN`` = median ms per image of decode + features + generator + post
      (masks at image size, RLE records, shard line); ``x_oap_e2e_G_tN`` = that / OAP's, same run (not on
      the oap row); ``e2e`` = {"G_tN": {median_ms, min_ms, max_ms, parts_ms: {decode, features, generator,
      post} of the median call (they sum to median_ms), parts: {part: {median_ms, min_ms, max_ms}},
      masks_per_image, cpu_per_wall (per call; maskcut_crf's call is maskcut's), threads, images, passes,
      calls, input_px}};
    * ``oap.nodes`` = {"C_G": {tokens, instance_nodes (mean per layer), semantic_nodes, *_per_image}};
    * ``features``: ``ms_per_image_G`` (all cores; ``ms_per_image`` = the largest grid), ``input_px_G``;
    * ``oap_gpu`` (``--device cuda``): ``ms_per_image`` (smooth), ``ms_per_image_rough``, spread, batch,
      grid, gpu, nodes, ``x_maskcut_cpu_tN`` (CPU MaskCut / GPU OAP);
    * ``targets``: {speed_G_tN[_C]: {maskcut_over_oap, target, met}, quality_G: {...}};
    * ``protocol``: {settings: the flags, overrides, thread counts, stride, phi per grid, stage_s (seconds per
      stage), wall_s, ...}.
    """
    from labelwise.errors import LabelwiseError
    from labelwise.io import read_image
    from labelwise.pseudo.common import (
        FeatureExtractor,
        build_method,
        resolve_pseudo_config,
    )

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LabelwiseError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise LabelwiseError(f"--device {args.device}: use cpu or cuda")
    try:
        threads = parse_threads(args.threads)
    except ValueError as e:
        raise LabelwiseError(str(e)) from None
    contents = [c.strip() for c in str(args.content).split(",") if c.strip()]
    bad = [c for c in contents if c not in CONTENTS]
    if bad:
        raise LabelwiseError(f"--content {args.content}: unknown case {bad[0]!r}; use {', '.join(CONTENTS)}")
    photos = [p.strip() for p in str(args.photos).split(",") if p.strip()]
    if "photo" in contents and not photos:
        raise LabelwiseError("--content photo needs --photos")
    if args.passes < 1 or args.speed_images < 1:
        raise LabelwiseError("--passes and --speed-images must be >= 1")
    grids = [] if args.no_speed else list(args.grids)
    qgrids = [] if args.no_quality else list(args.quality_grids)
    cores = num_cores()
    all_threads = cores                                     # features, quality and GPU runs: untimed or not CPU

    overrides = list(args.overrides)
    flags = {"features": {"backbone": args.backbone}, "oap": {"min_area_frac": float(args.min_area_frac)}}

    def config(method: str, defining: list[str]):
        return resolve_pseudo_config(method, overrides + defining, flags)

    def build(method: str, defining: list[str]):
        return build_method(method, config(method, defining))

    speed_cfgs = {k: config(m, o) for k, (m, o) in SPEED_VARIANTS.items()}
    speed_runs = {k: build_method(SPEED_VARIANTS[k][0], cfg) for k, cfg in speed_cfgs.items()}
    results: dict[str, dict] = {k: {} for k in SPEED_VARIANTS}
    results["features"] = {}
    oap_nodes: dict[str, dict] = {}
    t_start = time.perf_counter()
    stage_s: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        stage_s[name] = round(stage_s.get(name, 0.0) + time.perf_counter() - t0, 1)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        _log("generating / reading the data")
        root, split, images, anns = _dataset(args, tmp)
        arrays = [read_image(im["path"]) for im in images]
        n_speed = max(1, min(args.speed_images, len(images)))

        fe = FeatureExtractor(args.backbone, args.weights, 256, device)
        stride = _native_stride(fe)

        # ------------------------------------------------------------ features (all cores)
        t_stage = time.perf_counter()
        gpu_grid = max(grids or [56]) if device.type == "cuda" else None
        need: dict[int, int] = {}
        for g in grids:
            need[g] = max(need.get(g, 0), n_speed)
        for g in qgrids:
            need[g] = len(images)
        if gpu_grid is not None:
            need[gpu_grid] = max(need.get(gpu_grid, 0), min(len(images), args.gpu_batch))
        keys: dict[int, torch.Tensor] = {}
        photo_keys: dict[int, torch.Tensor] = {}
        photo_arrays = _photos(photos) if photos and (grids or "photo" in contents) else []
        with pinned_threads(all_threads):
            for g in sorted(need):
                fe.resolution = g * stride
                n = need[g]
                bar = _progress_bar(n, f"features {g}x{g} ({g * stride} px)")
                feats, ts = [], []
                for a in arrays[:n]:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    k = fe([a])
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    ts.append(time.perf_counter() - t0)
                    feats.append(k.cpu())
                    bar.update(1)
                bar.close()
                keys[g] = torch.cat(feats)
                if tuple(keys[g].shape[1:3]) != (g, g):
                    raise LabelwiseError(f"backbone {args.backbone}: {g * stride} px gave a "
                                         f"{tuple(keys[g].shape[1:3])} grid, expected {g}x{g}")
                results["features"][f"ms_per_image_{g}"] = 1000.0 * statistics.median(ts[1:] or ts)
                results["features"][f"input_px_{g}"] = g * stride
                if g in grids and photo_arrays:
                    photo_keys[g] = torch.cat([fe([p]).cpu() for p in photo_arrays])
        results["features"]["threads"] = all_threads
        if need:
            results["features"]["ms_per_image"] = results["features"][f"ms_per_image_{max(need)}"]
        stage("features", t_stage)
        results["features"]["device"] = str(device)

        # ------------------------------------------------------------ speed (CPU)
        gen = torch.Generator().manual_seed(args.seed)
        content_keys: dict[tuple[str, int], torch.Tensor] = {}
        for g in grids:
            for c in contents:
                if c == "smooth":
                    content_keys[c, g] = keys[g][:n_speed]
                elif c == "rough":
                    content_keys[c, g] = add_noise(keys[g][:n_speed], args.rough_noise, gen)
                else:
                    content_keys[c, g] = photo_keys[g][:n_speed]
        if grids:
            total = sum(len(speed_runs) * (1 + args.passes * len(v)) for v in content_keys.values()) * len(threads)
            bar = _progress_bar(total, "speed")
            for c in contents:
                for g in grids:
                    items = [content_keys[c, g][i:i + 1] for i in range(len(content_keys[c, g]))]
                    for n in threads:
                        t_stage = time.perf_counter()
                        _log(f"speed: {c} {g}x{g}, {n} thread(s), {len(items)} images x {args.passes} passes")
                        stats: list[dict] = []

                        def on_call(name, p, i, stats=stats):
                            if name == "oap" and p == 0:
                                stats.append(dict(speed_runs["oap"].impl.last_stats))

                        with pinned_threads(n):
                            t = time_variants(speed_runs, items, args.passes, bar=bar, on_call=on_call)
                        tag = f"{c}_{g}_t{n}"
                        for name, tv in t.items():
                            s = _summary(tv, n, len(items), args.passes)
                            results[name].setdefault("timing", {})[tag] = s
                            flat = f"ms_per_image_{g}_t{n}" if c == "smooth" else f"ms_per_image_{c}_{g}_t{n}"
                            results[name][flat] = s["median_ms"]
                        for name in t:
                            if name != "oap":
                                flat = f"{g}_t{n}" if c == "smooth" else f"{c}_{g}_t{n}"
                                results[name][f"x_oap_{flat}"] = (results[name][f"ms_per_image_{flat}"]
                                                                  / results["oap"][f"ms_per_image_{flat}"])
                        if f"{c}_{g}" not in oap_nodes:
                            oap_nodes[f"{c}_{g}"] = _node_summary(stats, g * g)
                        stage(f"speed_{c}_{g}_t{n}", t_stage)
            bar.close()
            for name in speed_runs:
                results[name]["ms_per_image"] = results[name][
                    (f"ms_per_image_{max(grids)}_t{threads[0]}" if contents[0] == "smooth"
                     else f"ms_per_image_{contents[0]}_{max(grids)}_t{threads[0]}")]
        # ------------------------------------------------------------ end to end (CPU unless --device cuda)
        if grids and not args.no_e2e:
            _e2e(args, results, images[:n_speed], fe, stride, grids, threads, speed_runs, speed_cfgs, build, tmp,
                 stage)
        # node counts on the photos (OAP only; cheap) when they were not timed
        if photo_keys and "photo" not in contents:
            impl = speed_runs["oap"]
            with pinned_threads(all_threads):
                for g in grids:
                    st = []
                    for i in range(len(photo_keys[g])):
                        impl(photo_keys[g][i:i + 1])
                        st.append(dict(impl.impl.last_stats))
                    oap_nodes[f"photo_{g}"] = _node_summary(st, g * g)
                    oap_nodes[f"photo_{g}"]["photos"] = photos
        results["oap"]["nodes"] = oap_nodes

        # ------------------------------------------------------------ quality (all cores)
        if qgrids:
            from labelwise.blocks.crf import crf_available

            qvariants = dict(QUALITY_VARIANTS)
            if not crf_available():
                qvariants.pop("maskcut_crf")
            qruns = {k: build(m, o) for k, (m, o) in qvariants.items()}
            results["oracle"] = {}
            n_rows = 3 * len(qgrids) + 3                            # method calls per image
            bar = _progress_bar(n_rows * len(images), "quality")
            with pinned_threads(all_threads):
                for g in qgrids:
                    t_stage = time.perf_counter()
                    _log(f"quality: {g}x{g}, {len(images)} images of {split}")
                    kq = keys[g]
                    for name in ("oap", "maskcut", "tokencut"):
                        post = {name: qruns[name].impl if name != "oap" else None}
                        if name == "maskcut" and "maskcut_crf" in qruns:
                            post["maskcut_crf"] = qruns["maskcut_crf"].impl
                        rows = _predict(_counting(qruns[name], bar), kq, images, arrays, post)
                        for row, preds in rows.items():
                            sc = _score(f"{row}_{g}", preds, root, split, tmp)
                            results.setdefault(row, {})
                            for k, v in sc.items():
                                results[row][f"{k}_{g}"] = v
                            results[row][f"masks_per_image_{g}"] = len(preds) / max(1, len(images))
                    sc = _score(f"oracle_{g}", _oracle_records(images, arrays, anns, g), root, split, tmp)
                    for k, v in sc.items():
                        results["oracle"][f"{k}_{g}"] = v
                    stage(f"quality_{g}", t_stage)

                # ground-truth features at --gt-grid
                t_stage = time.perf_counter()
                gg = args.gt_grid
                _log(f"quality: ground-truth features {gg}x{gg}, D={args.gt_dim}, noise {args.gt_noise}")
                ggen = torch.Generator().manual_seed(args.seed + 1)
                gkeys = torch.stack([gt_features(token_majority(region_ids(anns[int(im["id"])], *a.shape[:2]), gg),
                                                 args.gt_dim, args.gt_noise, ggen)
                                     for im, a in zip(images, arrays)])
                for name in ("oap", "maskcut", "tokencut"):
                    m, o = QUALITY_VARIANTS[name]
                    cfg = resolve_pseudo_config(m, GT_OVERRIDES + overrides + o, flags)
                    fn = build_method(m, cfg)
                    rows = _predict(_counting(fn, bar), gkeys, images, arrays,
                                    {f"{name}_gtfeat": fn.impl if name != "oap" else None})
                    for row, preds in rows.items():
                        sc = _score(row, preds, root, split, tmp)
                        results[row] = {f"{k}_{gg}": v for k, v in sc.items()}
                        results[row][f"masks_per_image_{gg}"] = len(preds) / max(1, len(images))
                if gg not in qgrids:
                    sc = _score(f"oracle_{gg}", _oracle_records(images, arrays, anns, gg), root, split, tmp)
                    for k, v in sc.items():
                        results["oracle"][f"{k}_{gg}"] = v
                stage("quality_gtfeat", t_stage)
            bar.close()

        # ------------------------------------------------------------ GPU OAP
        if device.type == "cuda":
            results["oap_gpu"] = _gpu_oap(args, keys[gpu_grid], speed_runs["oap"].impl, device, gen)
            for n in threads:
                mc = results["maskcut"].get(f"ms_per_image_{gpu_grid}_t{n}")
                if mc:
                    results["oap_gpu"][f"x_maskcut_cpu_{gpu_grid}_t{n}"] = mc / results["oap_gpu"]["ms_per_image"]

    # ---------------------------------------------------------------- targets, protocol
    targets: dict[str, dict] = {}
    for c in contents:
        for g in grids:
            flat = f"{g}_t{threads[0]}" if c == "smooth" else f"{c}_{g}_t{threads[0]}"
            if f"x_oap_{flat}" in results["maskcut"]:
                goal = 100.0 if g >= 56 else 30.0
                r = results["maskcut"][f"x_oap_{flat}"]
                targets[f"speed_{flat}"] = {"maskcut_over_oap": r, "target": goal, "met": bool(r >= goal)}
    for g in qgrids:
        o, m = results.get("oap", {}), results.get("maskcut", {})
        if f"ap50_{g}" in o and f"ap50_{g}" in m:
            targets[f"quality_{g}"] = {"oap_ap50": o[f"ap50_{g}"], "maskcut_ap50": m[f"ap50_{g}"],
                                       "oap_ar100": o[f"ar100_{g}"], "maskcut_ar100": m[f"ar100_{g}"],
                                       "target": "OAP AP50 and AR100 >= MaskCut's",
                                       "met": bool(o[f"ap50_{g}"] >= m[f"ap50_{g}"]
                                                   and o[f"ar100_{g}"] >= m[f"ar100_{g}"])}
    results["targets"] = targets
    results["protocol"] = {"settings": {
        "data": args.data or f"objects testbed (train {args.train}, val {args.val}, {args.size} px, seed {args.seed})",
        "split": args.quality_split, "images_scored": len(images) if qgrids else 0, "speed_images": n_speed,
        "passes": args.passes, "warmup_calls": 1, "threads": threads, "cores": cores, "content": contents,
        "e2e": bool(grids) and not args.no_e2e,
        "rough_noise": args.rough_noise, "rough_snr_db": (0.0 - 20.0 * float(np.log10(args.rough_noise))
                                                          if args.rough_noise > 0 else None),
        "photos": photos, "grids": grids, "quality_grids": qgrids, "backbone": args.backbone,
        "stride": stride, "min_area_frac": float(args.min_area_frac),
        "phi_tokens": {str(g): max(1, round(float(args.min_area_frac) * g * g)) for g in sorted(set(grids + qgrids))},
        "gt_grid": args.gt_grid, "gt_dim": args.gt_dim, "gt_noise": args.gt_noise, "gt_overrides": GT_OVERRIDES,
        "overrides": overrides,
        "variant_overrides": {k: o for k, (_, o) in {**SPEED_VARIANTS, **QUALITY_VARIANTS}.items()},
        "device": str(device), "torch": torch.__version__, "wall_s": round(time.perf_counter() - t_start, 1),
        "stage_s": stage_s,
        "note": ("speed = token-level algorithm only, batch 1, MaskCut/TokenCut on the CPU; "
                 "development figures on a shared machine are noisy")}}
    out = {k: dict(sorted(v.items(), key=lambda kv: (kv[0] != "ms_per_image", kv[0]))) for k, v in results.items()}
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(markdown(out))
    _log(f"done in {time.perf_counter() - t_start:.0f} s")
    return out


def _e2e(args, results: dict, images: list[dict], fe, stride: int, grids: list[int], threads: list[int],
         speed_runs: dict, speed_cfgs: dict, build, tmp: Path, stage) -> None:
    """The end-to-end rows (see the module doc) into ``results``: the speed rows' generators
    (``speed_runs``, built from ``speed_cfgs``), plus MaskCut's CRF post-processing (its variant made by
    ``build``) when pydensecrf2 is there."""
    from labelwise.blocks.crf import crf_available
    from labelwise.engine.writers import CocoRLEWriter

    runs, rows = {}, {}
    for name, fn in speed_runs.items():
        posts = {name: getattr(fn.impl, "postprocess", None)}
        if name == "maskcut" and crf_available():              # the command's default when pydensecrf2 is there
            m2, o2 = QUALITY_VARIANTS["maskcut_crf"]
            posts["maskcut_crf"] = build(m2, o2).impl.postprocess
        rows[name] = list(posts)
        runs[name] = (fn, tuple(speed_cfgs[name].levels), posts)
    writers = {row: CocoRLEWriter(tmp / "e2e" / f"{row}.json") for rs in rows.values() for row in rs}
    items = list(range(len(images)))
    total = len(runs) * (1 + args.passes * len(items)) * len(grids) * len(threads)
    bar = _progress_bar(total, "end to end")
    try:
        for g in grids:
            fe.resolution = g * stride                            # the speed rows' native input
            for n in threads:
                t_stage = time.perf_counter()
                _log(f"end to end: {g}x{g} ({g * stride} px), {n} thread(s), {len(items)} images x "
                     f"{args.passes} passes")
                log: dict[str, list[dict]] = {name: [] for name in runs}

                def call(i, name):
                    fn, levels, posts = runs[name]
                    log[name].append(e2e_call(images[i]["path"], images[i]["file_name"], fe, fn, levels, posts,
                                              writers))

                fns = {name: (lambda i, name=name: call(i, name)) for name in runs}
                with pinned_threads(n):
                    t = time_variants(fns, items, args.passes, bar=bar)
                tag = f"{g}_t{n}"
                for name, rs in rows.items():
                    timed = log[name][1:]                         # [0] = the warm-up call
                    for row in rs:
                        s = _e2e_summary([c[row] for c in timed], t[name]["cpu"], t[name]["wall"], n, len(items),
                                         args.passes)
                        s["input_px"] = g * stride
                        r = results.setdefault(row, {})
                        r.setdefault("e2e", {})[tag] = s
                        r[f"e2e_ms_per_image_{tag}"] = s["median_ms"]
                for rs in rows.values():
                    for row in rs:
                        if row != "oap":
                            results[row][f"x_oap_e2e_{tag}"] = (results[row][f"e2e_ms_per_image_{tag}"]
                                                                / results["oap"][f"e2e_ms_per_image_{tag}"])
                stage(f"e2e_{tag}", t_stage)
    finally:
        bar.close()
        for w in writers.values():
            w.close()


def _counting(fn, bar):
    def run(keys):
        out = fn(keys)
        bar.update(int(keys.shape[0]))
        return out
    run.impl = getattr(fn, "impl", None)
    return run


def _photos(names: list[str]) -> list[np.ndarray]:
    import skimage.data

    from labelwise.errors import LabelwiseError

    out = []
    for n in names:
        try:
            im = getattr(skimage.data, n)()
        except (AttributeError, ImportError, OSError, ValueError) as e:  # unknown name, or needs a download
            raise LabelwiseError(f"--photos {n}: not available from skimage.data ({type(e).__name__})") from None
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        out.append(np.ascontiguousarray(im[..., :3]).astype(np.uint8))
    return out


def _gpu_oap(args, keys: torch.Tensor, impl, device: torch.device, gen: torch.Generator) -> dict:
    """OAP on the GPU: batches of ``--gpu-batch`` images (repeating the images when there are fewer),
    one warm-up call, ``--passes`` timed calls, synchronised; ms per image, masks stay on the GPU."""
    B = args.gpu_batch
    idx = torch.arange(B) % keys.shape[0]
    out: dict = {"batch": B, "grid": int(keys.shape[1]), "gpu": torch.cuda.get_device_name(device),
                 "distinct_images": int(min(B, keys.shape[0])), "passes": args.passes}
    for case, k in (("", keys[idx]), ("_rough", add_noise(keys[idx], args.rough_noise, gen))):
        kb = k.to(device)
        impl(kb)                                                    # warm-up (kernels, allocator)
        torch.cuda.synchronize(device)
        ts = []
        for _ in range(args.passes):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            impl(kb)
            torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
        ms = [1000.0 * t / B for t in ts]
        out[f"ms_per_image{case}"] = statistics.median(ms)
        out[f"ms_per_image{case}_min"] = min(ms)
        out[f"ms_per_image{case}_max"] = max(ms)
        st = impl.last_stats
        out.setdefault("nodes", {})[(case[1:] or "smooth") + f"_{keys.shape[1]}"] = {
            "tokens": int(st["tokens"]) // B,
            "instance_nodes": [round(v / B, 1) for v in st["instance_nodes"]],
            "semantic_nodes": [round(v / B, 1) for v in st["semantic_nodes"]]}
        del kb
    return out


# --------------------------------------------------------------------------- markdown
def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _f3(v) -> str:
    return "" if v is None else ("nan" if math.isnan(v) else f"{v:.3f}")


def markdown(res: dict) -> str:
    """The README tables from a result dict: speed per content case (median [min–max] ms per image, and the
    ratio to OAP), the thread check (CPU time / wall time), quality, supernodes per layer, targets."""
    prot = res.get("protocol", {}).get("settings", {})
    lines: list[str] = []
    speed_rows = [k for k in SPEED_VARIANTS if "timing" in res.get(k, {})]
    tags = list(res["oap"].get("timing", {})) if "oap" in res else []
    contents = list(dict.fromkeys(t.split("_")[0] for t in tags))
    label = {"oap": "**OAP**", "maskcut": "MaskCut, dense `eigh` (released, no CRF)", "maskcut_lanczos":
             "MaskCut, Lanczos", "tokencut": "TokenCut, dense `eigh` (released)", "tokencut_lanczos":
             "TokenCut, Lanczos", "maskcut_crf": "MaskCut + CRF (released)", "oracle": "oracle (GT snapped to grid)",
             "oap_gtfeat": "OAP, GT features", "maskcut_gtfeat": "MaskCut, GT features",
             "tokencut_gtfeat": "TokenCut, GT features"}
    for c in contents:
        ctags = [t for t in tags if t.split("_")[0] == c]
        cols = [f"{t.split('_')[1]}² · {t.split('_t')[1]} thr" for t in ctags]
        lines += [(f"Speed, `{c}` content — ms per image, median [min–max] over "
                   f"{prot.get('speed_images', '?')} images x {prot.get('passes', '?')} passes; x = ratio to OAP"), "",
                  "| variant | " + " | ".join(cols) + " | " + " | ".join(f"x OAP {col}" for col in cols) + " |",
                  "|---|" + "---:|" * (2 * len(cols))]
        for v in speed_rows:
            tm = res[v]["timing"]
            cells = [f"{_ms(tm[t]['median_ms'])} [{_ms(tm[t]['min_ms'])}–{_ms(tm[t]['max_ms'])}]" for t in ctags]
            ratios = ["" if v == "oap" else f"{tm[t]['median_ms'] / res['oap']['timing'][t]['median_ms']:.1f}x"
                      for t in ctags]
            lines.append(f"| {label.get(v, v)} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        lines.append("")
    if tags:
        lines += ["Thread check — process CPU time / wall time (should be <= threads):", "",
                  "| variant | " + " | ".join(f"{t.replace('_', ' ')}" for t in tags) + " |",
                  "|---|" + "---:|" * len(tags)]
        for v in speed_rows:
            lines.append(f"| {v} | " + " | ".join(f"{res[v]['timing'][t]['cpu_per_wall']:.2f}" for t in tags) + " |")
        lines.append("")
    if "features" in res and any(k.startswith("ms_per_image_") for k in res["features"]):
        fg = sorted(int(k.rsplit("_", 1)[1]) for k in res["features"] if k.startswith("ms_per_image_"))
        lines += ["Feature extraction (not in any ratio), ms per image at "
                  f"{res['features'].get('threads', '?')} threads: "
                  + ", ".join(f"{g}² ({res['features'].get(f'input_px_{g}', '?')} px) "
                              f"{_ms(res['features'][f'ms_per_image_{g}'])}" for g in fg), ""]
    e2e_rows = [k for k in E2E_ROWS if "e2e" in res.get(k, {})]
    if e2e_rows:
        etags = list(res[e2e_rows[0]]["e2e"])
        lines += [("End to end, ms per image: decode + features + generator + masks/RLE — the per-image path of "
                   "`labelwise pseudo-masks`, batch 1, threads pinned; total = median [min–max] over "
                   f"{prot.get('speed_images', '?')} images x {prot.get('passes', '?')} passes; the parts are "
                   "those of the median call (they add up to the total); x = total / OAP's total"), "",
                  "| variant | grid · threads | decode | features | generator | masks/RLE | total | x OAP "
                  "| masks/img |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for t in etags:
            g, n = t.split("_t")
            for v in e2e_rows:
                e = res[v]["e2e"].get(t)
                if e is None:
                    continue
                pm = e["parts_ms"]
                ratio = "" if v == "oap" else f"{res[v][f'x_oap_e2e_{t}']:.1f}x"
                lines.append(f"| {label.get(v, v)} | {g}² ({e.get('input_px', '?')} px) · {n} thr | "
                             + " | ".join(_ms(pm[p]) for p in E2E_PARTS)
                             + f" | {_ms(e['median_ms'])} [{_ms(e['min_ms'])}–{_ms(e['max_ms'])}] | {ratio} | "
                             f"{e['masks_per_image']:.1f} |")
        lines.append("")
    if "oap_gpu" in res:
        gp = res["oap_gpu"]
        lines += [f"GPU OAP ({gp['gpu']}, batch {gp['batch']}, {gp['grid']}², masks left on the GPU): "
                  f"{gp['ms_per_image']:.2f} ms per image [{gp['ms_per_image_min']:.2f}–{gp['ms_per_image_max']:.2f}]"
                  f", rough {gp.get('ms_per_image_rough', float('nan')):.2f}; "
                  + ", ".join(f"CPU MaskCut / GPU OAP {k.split('_')[-1]}: {v:.0f}x"
                              for k, v in gp.items() if k.startswith("x_maskcut_cpu")), ""]
    qrows = [k for k in ("oap", "maskcut", "maskcut_crf", "tokencut", "oracle", "oap_gtfeat", "maskcut_gtfeat",
                         "tokencut_gtfeat") if any(x.startswith("ap50_") for x in res.get(k, {}))]
    if qrows:
        qg = sorted({int(x.split("_")[1]) for k in qrows for x in res[k] if x.startswith("ap50_")})
        lines += [(f"Quality — class-agnostic mask AP50 / AP / AR100, things only, {prot.get('images_scored', '?')} "
                   f"{prot.get('split', '')} images; OAP phi = {prot.get('min_area_frac', 0):.5f} of the grid "
                   f"({', '.join(f'{v} tokens at {k}²' for k, v in prot.get('phi_tokens', {}).items())}); "
                   f"GT features: {prot.get('gt_dim', '?')}-d unit prototypes + noise {prot.get('gt_noise', '?')}"), "",
                  "| variant | " + " | ".join(f"{g}²: AP50 / AP / AR100 (masks/img)" for g in qg) + " |",
                  "|---|" + "---:|" * len(qg)]
        for k in qrows:
            r = res[k]
            cells = [(f"{_f3(r[f'ap50_{g}'])} / {_f3(r[f'ap_{g}'])} / {_f3(r[f'ar100_{g}'])}"
                      + (f" ({r[f'masks_per_image_{g}']:.1f})" if f"masks_per_image_{g}" in r else ""))
                     if f"ap50_{g}" in r else "" for g in qg]
            lines.append(f"| {label.get(k, k)} | " + " | ".join(cells) + " |")
        lines.append("")
    nodes = res.get("oap", {}).get("nodes", {})
    if nodes:
        L = max(len(n["instance_nodes"]) for n in nodes.values())
        lines += ["OAP supernodes left after each layer, mean per image — instance (semantic):", "",
                  "| content, grid | tokens | " + " | ".join(f"layer {t}" for t in range(L)) + " |",
                  "|---|---:|" + "---:|" * L]
        for tag, n in nodes.items():
            cells = [f"{a:g} ({b:g})" for a, b in zip(n["instance_nodes"], n["semantic_nodes"] or
                                                       [float("nan")] * len(n["instance_nodes"]))]
            lines.append(f"| {tag.replace('_', ' ')}² | {n['tokens']} | " + " | ".join(cells) + " |")
        lines.append("")
    tg = res.get("targets", {})
    if tg:
        lines += ["Targets:", ""]
        for k, t in tg.items():
            if k.startswith("speed"):
                lines.append(f"- {k}: MaskCut / OAP = {t['maskcut_over_oap']:.1f}x (target >= {t['target']:.0f}x) — "
                             f"{'met' if t['met'] else 'not met'}")
            else:
                lines.append(f"- {k}: OAP AP50 {t['oap_ap50']:.3f} vs MaskCut {t['maskcut_ap50']:.3f}, AR100 "
                             f"{t['oap_ar100']:.3f} vs {t['maskcut_ar100']:.3f} — {'met' if t['met'] else 'not met'}")
        lines.append("")
    return "\n".join(lines)
