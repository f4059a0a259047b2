"""The sections of the ``labelwise demo`` report, built from files the demo recipe wrote.

Inputs are plain paths and dicts so the report can be rebuilt from an existing demo folder
(``labelwise run demo`` layout): the VOC testbed (``OUT/testbed``), the predictions of a
split in one folder (``OUT/pred_SPLIT/`` with ``<id>.npz`` CAM seeds and ``<id>.png``
pseudo-masks side by side), the evaluation dicts of :func:`labelwise.evaluation.evaluate`,
the recipe's comparison table rows (``OUT/table.json``) and the training log records.
The "seeds as mask" images are computed here from the ``.npz`` with
:func:`labelwise.blocks.cam.cam_to_label` at the run's background threshold -- the rule the
evaluator applies to score the seeds.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from labelwise.io import VOC_PALETTE, read_image, read_label
from labelwise.report.html import Section, figure_row, headline, html_table, img_html, swatch, write_report
from labelwise.report.images import colorize_label, heatmap, label_overlay, resize_image
from labelwise.report.svg import svg_line_plot

THUMB = 192  # displayed width of example images (small images are upscaled by the browser)
_NON_LOSS_KEYS = {"step", "lr", "epoch", "time", "elapsed", "elapsed_s", "sec", "s_per_step", "it_s",
                  "images_per_s", "grad_norm", "rank", "world_size", "ema_momentum"}


def class_names_of(data_root: Path) -> list[str]:
    p = Path(data_root) / "class_names.txt"
    if p.is_file():
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    return []


def pick_examples(ids: Sequence[str], k: int) -> list[str]:
    """``k`` ids spread evenly over the split (deterministic)."""
    ids = list(ids)
    if k <= 0 or not ids:
        return []
    if k >= len(ids):
        return ids
    idx = np.linspace(0, len(ids) - 1, k).round().astype(int)
    return [ids[i] for i in idx]


def cam_image(npz_path: Path, image: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Max over the present classes' CAMs as a jet heat map on the image, and the class keys."""
    with np.load(npz_path) as z:
        cams = z["cams"].astype(np.float32)
        keys = [int(k) for k in np.asarray(z["keys"]).reshape(-1)]
    cam = cams.max(axis=0) if cams.shape[0] else np.zeros(image.shape[:2], np.float32)
    return heatmap(cam, image, alpha=0.5, vmin=0.0, vmax=max(1e-6, float(cam.max()))), keys


def seeds_mask(npz_path: Path, bg_threshold: float) -> np.ndarray:
    """Seeds ``.npz`` -> label map (uint8): the present class of largest CAM, background where
    that CAM is ``<= bg_threshold`` (:func:`labelwise.blocks.cam.cam_to_label` with the keys)."""
    import torch

    from labelwise.blocks.cam import cam_to_label
    from labelwise.data.overrides import read_seeds

    seeds = read_seeds(npz_path)
    return cam_to_label(torch.from_numpy(seeds["cams"]), keys=torch.from_numpy(seeds["keys"]),
                        bg_threshold=float(bg_threshold)).numpy().astype(np.uint8)


def split_ids(data_root: Path, split: str) -> list[str]:
    """Image ids of ``split`` (``ImageSets/Segmentation/<split>.txt``; none if it is missing)."""
    f = Path(data_root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    return [ln.split()[0] for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []


def _photo_and_truth(data_root: Path, image_id: str) -> tuple[np.ndarray, list[str], list[int]]:
    """The photo, the figures that start its row (photo, ground truth if there is one) and the
    classes present in the ground truth."""
    img = read_image(Path(data_root) / "JPEGImages" / f"{image_id}.jpg")
    figs = [img_html(resize_image(img, 512), f"{image_id}", THUMB)]
    gt_path = Path(data_root) / "SegmentationClass" / f"{image_id}.png"
    present: list[int] = []
    if gt_path.is_file():
        gt = read_label(gt_path)
        present = [int(c) for c in np.unique(gt) if 0 < c < 255]
        figs.append(img_html(resize_image(colorize_label(gt), 512, nearest=True), "ground truth", THUMB))
    return img, figs, present


def _row_title(image_id: str, present: list[int], names: list[str]) -> str:
    tag_names = ", ".join(names[c] if c < len(names) else str(c) for c in present)
    return f"{image_id}: {tag_names}" if tag_names else image_id


def _legend(names: list[str]) -> str:
    return " ".join(f"{swatch(VOC_PALETTE[c])}{escape(n)}" for c, n in enumerate(names))


def examples_section(data_root: Path, pred_dir: Path, split: str, ids: Sequence[str],
                     names: list[str], bg_threshold: float) -> Section:
    """Per image: photo, ground truth, CAM heat map, seeds as mask (at ``bg_threshold``) and the
    pseudo-mask, read from ``pred_dir`` (``<id>.npz`` seeds and ``<id>.png`` pseudo-masks)."""
    d = Path(pred_dir)
    rows = []
    for i in ids:
        img, figs, present = _photo_and_truth(data_root, i)
        npz = d / f"{i}.npz"
        if npz.is_file():
            hm, _ = cam_image(npz, img)
            figs.append(img_html(resize_image(hm, 512), "CAM (max over tags)", THUMB))
            figs.append(img_html(resize_image(label_overlay(img, seeds_mask(npz, bg_threshold)), 512),
                                 f"seeds as mask (t={bg_threshold:g})", THUMB))
        if (d / f"{i}.png").is_file():
            figs.append(img_html(resize_image(label_overlay(img, read_label(d / f"{i}.png")), 512),
                                 "pseudo-mask", THUMB))
        rows.append(figure_row(figs, _row_title(i, present, names)))
    legend = _legend(names)
    intro = (f"<p>Images of the <b>{escape(split)}</b> split: the photo, its ground truth, the CAM heat map "
             "(maximum over the image's tag classes, jet colours: blue low, red high), the CAM seeds turned "
             f"into a mask (argmax over the tag classes, background where the CAM is &le; {bg_threshold:g}) "
             "and the pseudo-mask, as overlays.</p>"
             f"<p>{legend}</p>")
    return Section(f"Examples ({split})", intro + "".join(rows), anchor=f"examples-{split}")


def table_html(rows: Sequence[dict]) -> str:
    """The recipe's comparison table (rows of ``OUT/table.json``: one per evaluate stage)."""
    from labelwise.stages.table import headline_columns

    cols = headline_columns(list(rows))
    titles = {"miou": "mIoU", "confusion_ratio": "confusion ratio (FP/TP)", "pixel_acc": "pixel acc"}
    body = [[r.get("label") or r.get("stage"), r.get("split") or "-", *(r.get(k) for k in cols)] for r in rows]
    return html_table(["stage", "split", *(titles.get(k, k.replace("_", " ")) for k in cols)], body,
                      caption="Comparison table of the recipe's evaluate stages (OUT/table.md, OUT/table.json)")


def metrics_section(metrics: dict[str, dict[str, dict]], names: list[str],
                    sweeps: dict[str, dict] | None = None, mask_source: str = "",
                    table: Sequence[dict] = ()) -> Section:
    """The recipe's comparison table, per-split summary table and per-class IoU / confusion-ratio tables."""
    parts = [table_html(table)] if table else []
    rows = []
    for split, m in metrics.items():
        for kind, label in (("seeds", "CAM seeds as masks"), ("masks", "pseudo-masks")):
            r = m.get(kind)
            if r:
                rows.append([f"{split}: {label}", r.get("miou"), r.get("pixel_acc"), r.get("precision"),
                             r.get("recall"), r.get("confusion_ratio")])
    parts.append(html_table(["predictions", "mIoU", "pixel acc", "precision", "recall", "confusion ratio (FP/TP)"],
                            rows, caption="Summary (IoU-like values are fractions; confusion ratio: lower is better)"))
    for split, m in metrics.items():
        s, k = m.get("seeds", {}), m.get("masks", {})
        cls = names or list((k or s).get("per_class_iou", {}).keys())
        body = []
        for c, n in enumerate(cls):
            body.append([f"{swatch(VOC_PALETTE[c])}{escape(n)}",
                         s.get("per_class_iou", {}).get(n), k.get("per_class_iou", {}).get(n),
                         s.get("per_class_confusion_ratio", {}).get(n) if c else None,
                         k.get("per_class_confusion_ratio", {}).get(n) if c else None])
        parts.append(html_table(["class", "IoU seeds", "IoU pseudo-masks", "FP/TP seeds", "FP/TP pseudo-masks"],
                                body, caption=f"Per class, {split} split", raw_first_column=True))
    for split, sw in (sweeps or {}).items():
        parts.append(svg_line_plot({"mIoU": (sw["threshold"], sw["miou"])}, width=480, height=260,
                                   title=f"Seeds-as-masks mIoU vs background threshold ({split})",
                                   xlabel="background threshold", ylabel="mIoU"))
        parts.append(svg_line_plot({"FP/TP": (sw["threshold"], sw["confusion_ratio"])}, width=480, height=260,
                                   title=f"Confusion ratio vs background threshold ({split})",
                                   xlabel="background threshold", ylabel="FP/TP"))
    if sweeps:
        parts.append("<p>Analysis only: the run uses the fixed background threshold of its config "
                     "(never one tuned on the ground truth it is scored on).</p>")
    note = ("<p>The confusion ratio is false-positive over true-positive pixels of the foreground classes "
            "(SeCo, Sec. 4.1). On the <code>cooc</code> testbed classes co-occur with a partner class and a "
            "home context, so a CAM trained from image tags tends to spill onto them.</p>")
    if mask_source:
        note += f"<p>Pseudo-masks: {escape(mask_source)}.</p>"
    return Section("Metrics", note + "".join(parts), anchor="metrics")


def threshold_sweep(seed_dir: Path, gt_dir: Path, num_classes: int,
                    thresholds: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
                    ignore_index: int = 255) -> dict[str, list[float]]:
    """mIoU and confusion ratio (FP/TP, foreground) of seeds-as-masks at each background threshold.

    For every ``<id>.npz`` in ``seed_dir`` (other files, e.g. the pseudo-mask PNGs the demo keeps
    next to the seeds, are ignored) with a ground truth ``gt_dir/<id>.png``: label =
    the present class of largest CAM, background where that CAM is ``<= t``. An analysis
    plot only -- the run's threshold is fixed in its config, never picked from this curve.
    """
    T = len(thresholds)
    th = np.asarray(thresholds, dtype=np.float32).reshape(T, 1)
    C = int(num_classes)
    conf = np.zeros((T, C, C), dtype=np.int64)
    for f in sorted(Path(seed_dir).glob("*.npz")):
        gt_path = Path(gt_dir) / f"{f.stem}.png"
        if not gt_path.is_file():
            continue
        gt = read_label(gt_path).reshape(-1).astype(np.int64)
        with np.load(f) as z:
            cams = z["cams"].astype(np.float32).reshape(len(z["keys"]), -1)
            keys = np.asarray(z["keys"]).astype(np.int64).reshape(-1)
        if cams.shape[1] != gt.size:
            continue
        if len(keys):
            best = cams.argmax(0)
            score, label = cams[best, np.arange(gt.size)], keys[best]
        else:
            score, label = np.zeros(gt.size, np.float32), np.zeros(gt.size, np.int64)
        valid = (gt != ignore_index) & (gt < C)
        pred = np.where(score[None, valid] > th, label[None, valid], 0)  # T x N
        idx = np.arange(T)[:, None] * C * C + gt[None, valid] * C + np.clip(pred, 0, C - 1)
        conf += np.bincount(idx.reshape(-1), minlength=T * C * C).reshape(T, C, C)
    tp = np.diagonal(conf, axis1=1, axis2=2).astype(np.float64)
    fp = conf.sum(1) - tp
    fn = conf.sum(2) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
        miou = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in iou])
        tpf, fpf = tp[:, 1:].sum(1), fp[:, 1:].sum(1)
        cr = np.where(tpf > 0, fpf / np.maximum(tpf, 1), np.where(fpf > 0, np.inf, np.nan))
    return {"threshold": [float(t) for t in thresholds], "miou": [float(v) for v in miou],
            "confusion_ratio": [float(v) for v in cr]}


def loss_series(log: Sequence[dict]) -> tuple[dict, dict]:
    """``(losses, lr)`` series from log records: every numeric loss-like key vs step."""
    losses: dict[str, tuple[list, list]] = {}
    lr: dict[str, tuple[list, list]] = {}
    for rec in log:
        if "step" not in rec or "loss" not in rec:
            continue
        step = rec["step"]
        for k, v in rec.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if k == "lr" or k.startswith("lr_"):
                target = lr
            elif k in _NON_LOSS_KEYS or k.startswith(("eval", "val", "miou", "time")):
                continue
            else:
                target = losses
            xs, ys = target.setdefault(k, ([], []))
            xs.append(step)
            ys.append(v)
    # keep 'loss' first
    ordered = dict(sorted(losses.items(), key=lambda kv: (kv[0] != "loss", kv[0])))
    return ordered, lr


def training_section(log: Sequence[dict], summary: dict) -> Section:
    losses, lr = loss_series(log)
    html = []
    if losses:
        html.append(svg_line_plot(losses, title="Training loss", xlabel="step", ylabel="loss"))
    else:
        html.append("<p>No training log records found (RUN_DIR/log.jsonl).</p>")
    if lr:
        html.append(svg_line_plot(lr, width=640, height=220, title="Learning rate", xlabel="step", ylabel="lr",
                                  log_y=True))
    return Section("Training", f"<p>Run: <code>{escape(str(summary.get('run_dir', '')))}</code>.</p>" + "".join(html),
                   anchor="training")


def photos_section(photos: Sequence[tuple[str, np.ndarray, list]], note: str = "") -> Section:
    intro = ("<p>Real photos from <code>skimage.data</code> through EfficientNet-Lite0 with its ImageNet weights. "
             "For each of the top-3 classes the CAM is the classifier weight row of that class applied to the "
             "last feature map (ReLU, bilinear upsampling, max-normalised).</p>")
    if note:
        intro += f"<p><i>{escape(note)}</i></p>"
    rows = []
    for name, img, cams in photos:
        figs = [img_html(resize_image(img, 256), name, 224)]
        for c in cams:
            figs.append(img_html(resize_image(heatmap(c.cam, img, alpha=0.5), 256),
                                 f"{c.name} ({c.prob:.1%})", 224))
        rows.append(figure_row(figs, name))
    return Section("Real photos", intro + "".join(rows), anchor="real-photos")


def summary_section(summary: dict) -> Section:
    split = summary.get("headline_split", "train")
    items = [(f"seeds mIoU ({split})", summary.get("seeds_miou")),
             (f"pseudo-mask mIoU ({split})", summary.get("masks_miou")),
             ("confusion ratio seeds", summary.get("seeds_confusion_ratio")),
             ("confusion ratio pseudo-masks", summary.get("masks_confusion_ratio"))]
    el = summary.get("elapsed_s")
    settings = [["recipe", summary.get("recipe", "demo")], ["dataset", summary.get("data")],
                ["run", summary.get("run_dir")],
                ["method", f"cam ({summary.get('preset', 'cpu')} preset)"], ["last logged step", summary.get("steps")],
                ["seeds-as-mask background threshold", summary.get("seed_bg_threshold")],
                ["pseudo-masks", summary.get("pseudo_masks")],
                ["elapsed before the report", f"{el:.1f} s" if isinstance(el, (int, float)) else el]]
    html = (headline(items) + "<p>Plain CAM baseline trained from image-level tags on the synthetic "
            "<code>cooc</code> co-occurrence testbed; seeds and pseudo-masks of the training images "
            "(standard WSSS practice) and of the val split.</p>" + html_table(["setting", "value"], settings))
    return Section("Summary", html, anchor="summary")


def read_table(out: Path) -> list[dict]:
    """Rows of ``OUT/table.json`` (the recipe's comparison table); ``[]`` when it is not there."""
    import json

    p = Path(out) / "table.json"
    if not p.is_file():
        return []
    rows = json.loads(p.read_text())
    return rows if isinstance(rows, list) else []


def side_by_side_section(data_root: Path, split: str, ids: Sequence[str], names: list[str],
                         columns: Sequence[tuple[str, Path, str]], bg_threshold: float, title: str,
                         intro: str = "") -> Section:
    """Per image: photo, ground truth, then one overlay per column ``(caption, folder, kind)``:
    ``kind`` "label" overlays ``folder/<id>.png``, "seeds" the seeds ``folder/<id>.npz`` as a mask
    at ``bg_threshold``. A column without the image's file is left out of that row."""
    rows = []
    for i in ids:
        img, figs, present = _photo_and_truth(data_root, i)
        for caption, folder, kind in columns:
            f = Path(folder) / f"{i}.{'npz' if kind == 'seeds' else 'png'}"
            if f.is_file():
                lab = seeds_mask(f, bg_threshold) if kind == "seeds" else read_label(f)
                figs.append(img_html(resize_image(label_overlay(img, lab), 512), caption, THUMB))
        rows.append(figure_row(figs, _row_title(i, present, names)))
    return Section(title, intro + f"<p>{_legend(names)}</p>" + "".join(rows), anchor=f"side-by-side-{split}")


def cocal_section(ex, summary: Mapping[str, Any], gt: Mapping[str, Path] | None = None,
                  explain_link: str = "") -> Section:
    """``labelwise demo --with-cocal``: one parsed val image -- photo, ground-truth parts and objects
    (when ``gt`` names their PNGs), the part and object maps of the best ``part -> object`` paths,
    the path probability, the pixels the path changed and the legend of the paths present.
    ``ex``: a :class:`labelwise.report.explain.Explanation`; ``summary``: the demo's ``cocal`` dict
    (``run_dir``, ``steps``, ``data``)."""
    from labelwise.report.explain import PANEL_THUMB, parse_section_html
    from labelwise.report.show import draw_label_map, resize_nearest

    truth = []
    for level, label in (("parts", "ground truth parts"), ("objects", "ground truth objects")):
        f = Path((gt or {}).get(level, "")) if (gt or {}).get(level) else None
        if f is not None and f.is_file():
            lab = resize_nearest(read_label(f), ex.display.shape[:2])
            truth.append(img_html(resize_image(draw_label_map(ex.display, lab, alpha=0.55), PANEL_THUMB), label))
    steps = summary.get("steps")
    intro = (f"<p>CoCal (<code>cocal</code>, cpu preset, {escape(str(steps))} steps) trained on a small "
             f"<code>parts</code> testbed (<code>{escape(str(summary.get('data', '')))}</code>): every part and "
             "object class is one dictionary component, each pixel takes the best logical path "
             "<i>part &rarr; parent object</i> (part probability times its parent object's probability), so the "
             f"part and object maps agree by construction. Image <code>{escape(ex.image_name)}</code> of the val "
             "split.")
    if explain_link:
        intro += (f" The components' similarity maps and the part &harr; object component matrix: "
                  f"<a href=\"{escape(explain_link)}\">{escape(explain_link)}</a> (<code>labelwise explain</code>).")
    intro += "</p>"
    if truth:
        intro += '<div class="row">' + "".join(truth) + "</div>"
    return Section("CoCal object parsing (val)", intro + parse_section_html(ex), anchor="cocal")


def build_demo_report(path: Path, *, summary: dict, data_root: Path, pred_dirs: Mapping[str, Path],
                      bg_threshold: float, log: Sequence[dict], table: Sequence[dict] | None = None,
                      photos: Sequence = (), photo_note: str = "", n_examples: int = 6,
                      compare: Sequence[tuple[str, Path, str]] = (), compare_split: str = "val",
                      extra_sections: Sequence[Section] = ()) -> Path:
    """Write the demo's self-contained ``report.html`` and return its path.

    ``summary``: the demo's ``metrics.json`` dict (``headline_split``, ``metrics[split]["seeds"|"masks"]``,
    ``threshold_sweep``, ...); ``data_root``: the VOC testbed; ``pred_dirs``: ``{split: folder}`` with
    ``<id>.npz`` seeds and ``<id>.png`` pseudo-masks (``OUT/pred_SPLIT``); ``bg_threshold``: the run's
    background threshold (``infer.bg_threshold``), used for the "seeds as mask" images; ``log``: the
    training ``log.jsonl`` records; ``table``: the comparison table rows (None: read
    ``table.json`` next to ``path``); ``photos``: ``[(name, image, [ClassCAM])]`` of the real-photo
    section, ``photo_note`` a line shown there (e.g. why it was skipped); ``compare``: columns
    ``(caption, folder, "label" | "seeds")`` of a side-by-side section on ``compare_split`` (the
    CAM baseline beside another method, e.g. ``labelwise demo --with-seco``); ``extra_sections``:
    further sections after those (e.g. :func:`cocal_section`).
    """
    names = class_names_of(data_root)
    metrics: dict[str, Any] = summary.get("metrics", {})
    if table is None:
        table = read_table(Path(path).parent)
    sections = [summary_section(summary)]
    split = summary.get("headline_split") or next(iter(pred_dirs))
    ids = split_ids(data_root, split)
    if n_examples > 0 and split in pred_dirs:
        sections.append(examples_section(data_root, pred_dirs[split], split, pick_examples(ids, n_examples), names,
                                         bg_threshold))
    if n_examples > 0 and compare:
        intro = (f"<p>The same <b>{escape(compare_split)}</b> images through each method: seeds as masks at the "
                 f"background threshold {bg_threshold:g} and the final masks, as overlays.</p>")
        sections.append(side_by_side_section(data_root, compare_split,
                                             pick_examples(split_ids(data_root, compare_split), n_examples), names,
                                             compare, bg_threshold, f"Side by side ({compare_split})", intro))
    sections.extend(extra_sections)
    sweeps = summary.get("threshold_sweep")
    if sweeps is None and names and split in pred_dirs and Path(pred_dirs[split]).is_dir():
        sweeps = {split: threshold_sweep(pred_dirs[split], Path(data_root) / "SegmentationClass", len(names))}
    sections.append(metrics_section(metrics, names, sweeps, summary.get("pseudo_masks", ""), table))
    sections.append(training_section(log, summary))
    if photos or photo_note:
        sections.append(photos_section(photos, photo_note))
    return write_report(path, sections, title="labelwise demo",
                        subtitle="CAM baseline on the cooc testbed")
