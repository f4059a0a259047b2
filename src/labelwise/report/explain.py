"""What a CoCal parse is made of: the dictionary components, the chosen logical paths and the
part <-> object component similarities of one image. The engine of ``labelwise explain``;
every piece works from Python too.

CoCal (``methods/cocal``) gives every part class and every object class one dictionary
component; a pixel belongs to the component its embedding is nearest to, and with logical
constraints the part and object labels are read off the best ``part -> parent object`` path
(part probability x parent-object probability). For one image this module computes
(:func:`compute_explanation`) and draws (:func:`write_explanation`):

* each component's **similarity map**: the cosine between every pixel embedding
  (``pixel_feature``, unit length) and the component (``cluster_centres``, normalised here),
  upsampled to the image; one grid per level, one PNG per component;
* the **chosen path** of every pixel (:func:`labelwise.methods.cocal.logic.path_inference` on
  :func:`labelwise.methods.kmax.model.level_probabilities`): the part map, the object map, the
  legend of the ``part -> object`` paths present, the path probability and the pixels whose part
  the path changed (its part differs from the part level's own argmax, CoCal Fig. 3);
* the **part <-> object matrix**: cosine between the image's P part and P~ object components,
  with each part's true parent (the hierarchy's ``part_to_object``) marked.

Files (all under ``out``): ``index.html`` (self-contained), ``explain.json``, ``paths.png``,
``path_probability.png``, ``parts_components.png``, ``objects_components.png``,
``components/<level>_<id>_<name>.png``, ``similarity_matrix.png`` and the raw label maps
``labels/parts.png`` / ``labels/objects.png`` (class ids, VOC palette).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from labelwise.errors import LabelwiseError
from labelwise.io import VOC_PALETTE, atomic_write_json, read_image, write_image, write_label
from labelwise.report.html import Section, headline, html_table, img_html, swatch, write_report
from labelwise.report.images import heatmap, jet, overlay, resize_image
from labelwise.report.show import Panel, compose_row, draw_label_map, resize_nearest
from labelwise.report.images import ui_font as _font

__all__ = ["Explanation", "check_cocal_run", "compute_explanation", "explain_image", "path_legend_html",
           "paths_figures", "similarity_matrix_image", "write_explanation"]

MIN_DISPLAY = 192   # small images are enlarged to this longer side for drawing (titles need room)
THUMB = 128         # components in the HTML page
PANEL_THUMB = 256   # path panels in the HTML page
CHANGED_COLOR = (255, 0, 255)



# --------------------------------------------------------------------------- the numbers


@dataclass
class Explanation:
    """One image through a CoCal run. Maps at image size ``(H, W)`` unless said otherwise."""

    image: np.ndarray                   # H x W x 3 uint8
    part_names: list[str]
    object_names: list[str]
    part_to_object: list[int]
    part_similarity: np.ndarray         # P x h x w cosine maps (display size, see ``display``)
    object_similarity: np.ndarray       # P~ x h x w
    display: np.ndarray                 # the image at display size (h x w x 3)
    parts: np.ndarray                   # H x W part label of the best path
    objects: np.ndarray                 # H x W its object (= part_to_object[parts])
    path_prob: np.ndarray               # H x W probability of the best path
    part_argmax: np.ndarray             # H x W the part level's own argmax (no path)
    matrix: np.ndarray                  # P x P~ cosine between part and object components
    logic: bool = True                  # cocal.path_inference of the run (its own inference uses the paths)
    run_dir: str = ""
    image_name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def changed(self) -> np.ndarray:
        """Pixels whose part the best path changed (part argmax != path part)."""
        return self.parts != self.part_argmax

    def paths(self) -> list[dict]:
        """The ``part -> object`` paths present, most pixels first."""
        counts = np.bincount(self.parts.reshape(-1), minlength=len(self.part_names))
        prob_sum = np.bincount(self.parts.reshape(-1), weights=self.path_prob.reshape(-1).astype(np.float64),
                               minlength=len(self.part_names))
        total = max(int(self.parts.size), 1)
        out = []
        for p in np.flatnonzero(counts):
            o = int(self.part_to_object[p])
            out.append({"part": int(p), "part_name": self.part_names[p], "object": o,
                        "object_name": self.object_names[o], "pixels": int(counts[p]),
                        "share": float(counts[p]) / total, "mean_path_prob": float(prob_sum[p] / counts[p])})
        out.sort(key=lambda r: (-r["pixels"], r["part"]))
        return out

    def parent_is_nearest(self) -> list[bool]:
        """Per part: is its true parent the nearest object component (row argmax of the matrix)?"""
        return [int(np.argmax(self.matrix[p])) == int(self.part_to_object[p]) for p in range(len(self.part_names))]


def check_cocal_run(run_dir: str | Path):
    """The run's ``(run.json, method, config)``; a one-line :class:`LabelwiseError` unless it is a
    ``cocal`` run in dictionary mode (checked before any weights are loaded)."""
    from labelwise.config import load_config
    from labelwise.engine.api import read_run
    from labelwise.engine.registry import get_method

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LabelwiseError(f"RUN_DIR {run_dir}: folder not found; pass the --out folder of 'labelwise train cocal'")
    run = read_run(run_dir)
    name = run.get("method")
    if name != "cocal":
        raise LabelwiseError(f"RUN_DIR {run_dir}: holds a '{name}' run; explain needs a 'cocal' run in dictionary "
                             "mode -- pass the --out folder of 'labelwise train cocal' (cocal.dictionary=true)")
    method = get_method("cocal")
    cfg = load_config(method.config_cls, run_dir / "config.yaml")
    if not cfg.cocal.dictionary:
        raise LabelwiseError(f"RUN_DIR {run_dir}: config key cocal.dictionary is false (kMaX-DeepLab's free queries, "
                             "no class components to explain); pass a cocal run trained with cocal.dictionary=true "
                             "(the default)")
    return run, method, cfg


def _display_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    long = max(h, w)
    target = min(int(max_side), max(long, MIN_DISPLAY))
    s = target / long
    return max(1, round(h * s)), max(1, round(w * s))


def compute_explanation(loaded, image: np.ndarray, *, max_side: int = 384, image_name: str = "") -> Explanation:
    """Run the loaded CoCal run (:func:`labelwise.engine.api.load_run`) on ``image`` (H x W x 3
    ``uint8``) and gather the numbers of the explanation (see the module doc)."""
    import torch
    import torch.nn.functional as F

    from labelwise.methods.cocal.logic import path_inference
    from labelwise.methods.kmax.model import level_probabilities, upsample

    model, info, cfg = loaded.model, loaded.info, loaded.cfg
    if not getattr(model, "dictionary", False):
        raise LabelwiseError(f"RUN_DIR {loaded.run_dir}: the model is not in dictionary mode; pass a cocal run "
                             "trained with cocal.dictionary=true")
    P, O = int(model.num_parts), int(model.num_objects)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    H, W = image.shape[:2]
    dev = next(model.parameters()).device
    x = loaded.method.inference_transform(cfg, info)({"image": image})["input"][None].to(dev)
    with torch.no_grad():
        out = model(x)
        groups = [int(g) for g in out["query_groups"]]
        if groups != [P, O]:
            raise LabelwiseError(f"RUN_DIR {loaded.run_dir}: the model's query groups {groups} are not one component "
                                 f"per part ({P}) and per object ({O}); retrain with cocal.dictionary=true")
        pixel = F.normalize(out["pixel_feature"][0].float(), dim=0)             # D x h x w
        centres = F.normalize(out["cluster_centres"][0].float(), dim=-1)        # (P + P~) x D
        sim = torch.einsum("dhw,qd->qhw", pixel, centres)                        # cosine per component
        dh, dw = _display_size(H, W, max_side)
        sim = upsample(sim[None], (dh, dw))[0].clamp_(-1.0, 1.0).cpu().numpy()
        pp, po = level_probabilities(out, P, O, True)
        pp, po = upsample(pp, (H, W)), upsample(po, (H, W))
        p2o = torch.as_tensor(list(info.part_to_object), dtype=torch.long, device=pp.device)
        parts, objects, prob = path_inference(pp, po, p2o)
        part_argmax = pp.argmax(1)
        matrix = (centres[:P] @ centres[P:].T).double().cpu().numpy()
    display = np.asarray(Image.fromarray(image).resize((dw, dh), Image.BILINEAR)) if (dh, dw) != (H, W) else image
    return Explanation(
        image=image, part_names=list(info.part_names), object_names=list(info.class_names),
        part_to_object=[int(v) for v in info.part_to_object], part_similarity=sim[:P], object_similarity=sim[P:],
        display=np.ascontiguousarray(display), parts=parts[0].cpu().numpy().astype(np.int64),
        objects=objects[0].cpu().numpy().astype(np.int64), path_prob=prob[0].cpu().numpy().astype(np.float32),
        part_argmax=part_argmax[0].cpu().numpy().astype(np.int64), matrix=matrix,
        logic=bool(cfg.cocal.path_inference), run_dir=str(loaded.run_dir), image_name=image_name)


# --------------------------------------------------------------------------- drawing


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_") or "class"


def _vstack(images: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    W = max(im.shape[1] for im in images)
    H = sum(im.shape[0] for im in images) + gap * (len(images) - 1)
    canvas = np.full((H, W, 3), 255, dtype=np.uint8)
    y = 0
    for im in images:
        canvas[y:y + im.shape[0], :im.shape[1]] = im
        y += im.shape[0] + gap
    return canvas


def _text_strip(lines: Sequence[Sequence[tuple[str, tuple[int, int, int] | None]]], width: int,
                line_height: int = 16) -> np.ndarray:
    """Lines of ``(text, swatch colour or None)`` pieces, written left to right (a legend)."""
    H = line_height * len(lines) + 4
    pil = Image.new("RGB", (max(width, 8), H), (255, 255, 255))
    d = ImageDraw.Draw(pil)
    font = _font(11)
    y = 2
    for pieces in lines:
        x = 4
        for text, color in pieces:
            if color is not None:
                d.rectangle([x, y + 2, x + 11, y + 13], fill=tuple(int(c) for c in color), outline=(120, 120, 120))
                x += 15
            if text:
                d.text((x, y + 1), text, fill=(30, 30, 30), font=font)
                x += int(d.textlength(text, font=font)) + 6
        y += line_height
    return np.asarray(pil).copy()


def _colorbar(lo: float, hi: float, label: str, width: int = 240) -> np.ndarray:
    bar = jet(np.linspace(0.0, 1.0, width))[None].repeat(10, axis=0)
    pil = Image.new("RGB", (width + 16 + 400, 28), (255, 255, 255))
    pil.paste(Image.fromarray(bar), (8, 2))
    d = ImageDraw.Draw(pil)
    font = _font(10)
    d.text((8, 14), f"{lo:.2f}", fill=(30, 30, 30), font=font)
    t = f"{hi:.2f}"
    d.text((8 + width - d.textlength(t, font=font), 14), t, fill=(30, 30, 30), font=font)
    d.text((width + 16, 0), label, fill=(30, 30, 30), font=font)
    return np.asarray(pil).copy()


def _grid(panels: Sequence[Panel], cols: int) -> np.ndarray:
    rows = [compose_row(panels[i:i + cols]) for i in range(0, len(panels), cols)]
    return _vstack(rows)


def _level_range(sims: np.ndarray) -> tuple[float, float]:
    lo, hi = float(sims.min()), float(sims.max())
    return (lo, hi) if hi - lo > 1e-6 else (lo - 0.5, lo + 0.5)


def component_panels(ex: Explanation, level: str) -> tuple[list[Panel], tuple[float, float]]:
    """One heat-map panel per component of ``level`` ("parts" / "objects"), jet over the level's
    shared similarity range (returned), titled ``<id> <class name>``."""
    sims, names = ((ex.part_similarity, ex.part_names) if level == "parts" else (ex.object_similarity,
                                                                                 ex.object_names))
    lo, hi = _level_range(sims)
    present = {int(v) for v in np.unique(ex.parts if level == "parts" else ex.objects)}
    panels = []
    for k, name in enumerate(names):
        img = heatmap(sims[k], ex.display, alpha=0.6, vmin=lo, vmax=hi)
        mark = " *" if k in present else ""
        stats = f"max {float(sims[k].max()):.2f}, mean {float(sims[k].mean()):.2f}"
        panels.append(Panel(f"{k}: {name}{mark}", img, stats))
    return panels, (lo, hi)


def _label_disp(label: np.ndarray, disp: np.ndarray) -> np.ndarray:
    return resize_nearest(label, disp.shape[:2])


def paths_figures(ex: Explanation) -> list[Panel]:
    """Image, part map, object map (of the best paths), path probability, pixels the path changed."""
    disp = ex.display
    parts, objects = _label_disp(ex.parts, disp), _label_disp(ex.objects, disp)
    changed = _label_disp(ex.changed.astype(np.uint8), disp).astype(bool)
    n_changed = int(ex.changed.sum())
    pmax = max(float(ex.path_prob.max()), 1e-6)
    H, W = ex.image.shape[:2]
    return [
        Panel("image", disp.copy(), f"{W}x{H}"),
        Panel("parts (best path)", draw_label_map(disp, parts, alpha=0.55), f"{len(np.unique(ex.parts))} parts"),
        Panel("objects (its parent)", draw_label_map(disp, objects, alpha=0.55),
              f"{len(np.unique(ex.objects))} objects"),
        Panel("path probability", heatmap(ex.path_prob, disp, alpha=0.6, vmin=0.0, vmax=pmax),
              f"jet 0 .. {pmax:.2f}"),
        Panel("changed by the path", overlay(disp, np.array(CHANGED_COLOR, np.uint8), alpha=0.7, where=changed),
              f"{n_changed} px ({100.0 * n_changed / max(ex.parts.size, 1):.1f}%) differ from the part argmax"),
    ]


def _part_color(p: int) -> tuple[int, int, int] | None:
    return None if p == 0 else tuple(int(c) for c in VOC_PALETTE[p])


def _path_legend_lines(ex: Explanation) -> list[list[tuple[str, Any]]]:
    lines = []
    for r in ex.paths():
        pc = _part_color(r["part"]) or (255, 255, 255)
        oc = _part_color(r["object"]) or (255, 255, 255)
        lines.append([("", pc), (f"{r['part_name']} ->", None), ("", oc),
                      (f"{r['object_name']}   {r['pixels']} px ({100.0 * r['share']:.1f}%)", None)])
    return lines


def paths_image(ex: Explanation) -> np.ndarray:
    """``paths.png``: the path panels in a row and the legend of the paths present below."""
    row = compose_row(paths_figures(ex))
    head = [[("paths present (part -> object; background is left uncoloured):", None)]]
    return _vstack([row, _text_strip(head + _path_legend_lines(ex), row.shape[1])])


def similarity_matrix_image(ex: Explanation, cell: tuple[int, int] = (44, 20)) -> np.ndarray:
    """The P x P~ cosine matrix as a labelled heat map (jet over -1 .. 1), each part's true parent
    boxed in black."""
    P, O = ex.matrix.shape
    cw, ch = cell
    font = _font(11)
    small = _font(10)
    probe = ImageDraw.Draw(Image.new("RGB", (4, 4)))
    row_labels = [f"{p}: {n}" for p, n in enumerate(ex.part_names)]
    col_labels = [f"{o}: {n}" for o, n in enumerate(ex.object_names)]
    left = int(max(probe.textlength(t, font=font) for t in row_labels)) + 10
    top = int(max(probe.textlength(t, font=font) for t in col_labels)) + 10
    W, H = left + O * cw + 10, top + P * ch + 44
    pil = Image.new("RGB", (max(W, 420), H), (255, 255, 255))
    d = ImageDraw.Draw(pil)
    colors = jet((ex.matrix + 1.0) / 2.0)
    for o, t in enumerate(col_labels):  # rotated column titles
        tw = int(probe.textlength(t, font=font)) + 2
        lab = Image.new("RGB", (tw, 14), (255, 255, 255))
        ImageDraw.Draw(lab).text((1, 0), t, fill=(30, 30, 30), font=font)
        lab = lab.rotate(90, expand=True)
        pil.paste(lab, (left + o * cw + (cw - lab.width) // 2, top - 6 - lab.height))
    for p in range(P):
        y = top + p * ch
        d.text((4, y + 3), row_labels[p], fill=(30, 30, 30), font=font)
        for o in range(O):
            x = left + o * cw
            c = tuple(int(v) for v in colors[p, o])
            d.rectangle([x, y, x + cw - 1, y + ch - 1], fill=c)
            lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
            t = f"{ex.matrix[p, o]:.2f}"
            d.text((x + (cw - d.textlength(t, font=small)) / 2, y + 4), t,
                   fill=(0, 0, 0) if lum > 140 else (255, 255, 255), font=small)
        o = int(ex.part_to_object[p])
        x = left + o * cw
        d.rectangle([x, y, x + cw - 1, y + ch - 1], outline=(0, 0, 0), width=3)
    img = np.asarray(pil).copy()
    bar = _colorbar(-1.0, 1.0, "cosine; black box: the part's true parent (part_to_object)")
    return _vstack([img[:top + P * ch + 4], bar])


# --------------------------------------------------------------------------- HTML


def _photo_figure(image: np.ndarray, caption: str, alt: str = "", quality: int = 88) -> str:
    """A ``<figure>`` with a photo-like image inline as a base64 JPEG (heat maps over photos are
    several times smaller than as PNG, which keeps index.html small)."""
    import base64
    import io as _io

    buf = _io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{escape(alt or caption)}"/>'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def path_legend_html(ex: Explanation) -> str:
    """The paths present as a table: part and object swatches, pixels, share, mean path probability."""
    rows = []
    for r in ex.paths():
        pc = _part_color(r["part"]) or (255, 255, 255)
        oc = _part_color(r["object"]) or (255, 255, 255)
        rows.append([f"{swatch(pc)}{escape(r['part_name'])} &rarr; {swatch(oc)}{escape(r['object_name'])}",
                     r["pixels"], f"{100.0 * r['share']:.1f}%", r["mean_path_prob"]])
    return html_table(["path (part \u2192 object)", "pixels", "share", "mean path prob."], rows,
                      caption="Paths present (background is left uncoloured in the maps)", raw_first_column=True)


def _matrix_table_html(ex: Explanation) -> str:
    P, O = ex.matrix.shape
    nearest = ex.parent_is_nearest()
    head = "".join(f"<th>{escape(n)}</th>" for n in ex.object_names)
    body = []
    for p in range(P):
        parent = int(ex.part_to_object[p])
        best = int(np.argmax(ex.matrix[p]))
        cells = []
        for o in range(O):
            v = f"{ex.matrix[p, o]:.3f}"
            if o == parent:
                v = f"<b>[{v}]</b>"
            elif o == best:
                v = f"<u>{v}</u>"
            cells.append(f"<td>{v}</td>")
        body.append(f"<tr><td>{p} {escape(ex.part_names[p])}</td>{''.join(cells)}"
                    f"<td>{'yes' if nearest[p] else 'no'}</td></tr>")
    return ('<table class="lw"><caption>Cosine between part components (rows) and object components (columns); '
            "<b>[bold]</b>: the true parent, <u>underlined</u>: the nearest object where it is not the parent</caption>"
            f"<thead><tr><th>part</th>{head}<th>parent nearest</th></tr></thead><tbody>{''.join(body)}"
            "</tbody></table>")


def parse_section_html(ex: Explanation, thumb: int = PANEL_THUMB) -> str:
    """Image, part map, object map, path probability, changed pixels and the path legend (HTML)."""
    figs = "".join(_photo_figure(resize_image(p.image, thumb), f"{p.title}: {p.caption}", alt=p.title)
                   for p in paths_figures(ex))
    return f'<div class="row">{figs}</div>' + path_legend_html(ex)


def _html(ex: Explanation, files: dict, levels: dict, ranges: dict) -> list[Section]:
    P, O = len(ex.part_names), len(ex.object_names)
    paths = ex.paths()
    n_changed = int(ex.changed.sum())
    nearest = ex.parent_is_nearest()
    facts = [("part components", P), ("object components", O), ("paths present", len(paths)),
             ("pixels changed by the path", n_changed), ("parts nearest their parent", f"{sum(nearest)}/{P}")]
    H, W = ex.image.shape[:2]
    settings = [["run", ex.run_dir], ["image", f"{ex.image_name} ({W}x{H})"],
                ["run's inference", "best part -> object path (cocal.path_inference=true)" if ex.logic else
                 "independent argmax per level (cocal.path_inference=false); the paths below are what path "
                 "inference would choose"]]
    summary = headline(facts, digits=0) + html_table(["setting", "value"], settings)
    parse = ("<p>Each pixel takes the best logical path <i>part &rarr; parent object</i>: the part probability "
             "times its parent object's probability (CoCal Sec. 2.2.3, Fig. 3), so the part and object maps agree. "
             "<i>Changed by the path</i>: pixels whose part differs from the part level's own argmax.</p>"
             + parse_section_html(ex))
    sections = [Section("Summary", summary, "summary"), Section("Chosen paths", parse, "paths")]
    for level, title in (("parts", "Part components"), ("objects", "Object components")):
        panels = levels[level]
        lo, hi = ranges[level]
        intro = (f"<p>Cosine similarity of every pixel embedding with each {level[:-1]} component "
                 f"(jet over {lo:.2f} .. {hi:.2f}, shared by the level: blue low, red high); * marks classes in "
                 f"the parse. Grid: <code>{escape(files[level])}</code>; one PNG each under "
                 "<code>components/</code>.</p>")
        figs = "".join(_photo_figure(resize_image(p.image, THUMB), f"{p.title} ({p.caption})", alt=p.title)
                       for p in panels)
        sections.append(Section(title, intro + f'<div class="row">{figs}</div>', f"{level}-components"))
    mat = (img_html(similarity_matrix_image(ex), "part (rows) vs object (columns) components") +
           _matrix_table_html(ex))
    sections.append(Section("Part \u2194 object components", mat, "matrix"))
    return sections


# --------------------------------------------------------------------------- files


def write_explanation(ex: Explanation, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Write the PNGs, ``explain.json`` and ``index.html`` of ``ex`` into ``out``; returns the summary
    (the contents of ``explain.json``)."""
    from labelwise.utils import progress as progress_bar

    out = Path(out)
    (out / "components").mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"html": "index.html", "json": "explain.json", "paths": "paths.png",
                             "path_probability": "path_probability.png", "parts": "parts_components.png",
                             "objects": "objects_components.png", "matrix": "similarity_matrix.png",
                             "part_labels": "labels/parts.png", "object_labels": "labels/objects.png",
                             "components": []}
    ranges = {}
    jobs = [("parts", "part"), ("objects", "object")]
    levels = {}
    for level, _ in jobs:
        levels[level], ranges[level] = component_panels(ex, level)
    todo = [(level, short, k, p) for level, short in jobs for k, p in enumerate(levels[level])]
    names = {"parts": ex.part_names, "objects": ex.object_names}
    it = progress_bar(todo, desc="explain", total=len(todo)) if progress else todo
    for level, short, k, panel in it:
        rel = f"components/{short}_{k:02d}_{_slug(names[level][k])}.png"
        write_image(out / rel, compose_row([panel]))
        files["components"].append(rel)
    for level, _ in jobs:
        lo, hi = ranges[level]
        grid = _grid(levels[level], cols=8)
        bar = _colorbar(lo, hi, f"cosine with the {level[:-1]} component (shared range); * = in the parse")
        write_image(out / files[level], _vstack([grid, bar]))
    write_image(out / files["paths"], paths_image(ex))
    pmax = max(float(ex.path_prob.max()), 1e-6)
    write_image(out / files["path_probability"], heatmap(ex.path_prob, ex.display, alpha=0.6, vmin=0.0,
                                                                      vmax=pmax))
    write_image(out / files["matrix"], similarity_matrix_image(ex))
    write_label(out / files["part_labels"], ex.parts.astype(np.uint8))
    write_label(out / files["object_labels"], ex.objects.astype(np.uint8))
    H, W = ex.image.shape[:2]
    summary = {
        "run": ex.run_dir, "image": ex.image_name, "image_size": [int(H), int(W)],
        "part_names": ex.part_names, "object_names": ex.object_names, "part_to_object": ex.part_to_object,
        "logic": ex.logic,
        "similarity_matrix": [[float(v) for v in row] for row in ex.matrix],
        "similarity_matrix_axes": ["part component", "object component"],
        "parent_is_nearest": ex.parent_is_nearest(),
        "paths": ex.paths(), "changed_by_path": int(ex.changed.sum()),
        "similarity_range": {k: [float(a), float(b)] for k, (a, b) in ranges.items()},
        "component_similarity": {
            level: [{"id": k, "name": n, "max": float(s.max()), "mean": float(s.mean())}
                    for k, (n, s) in enumerate(zip(names[level], sims))]
            for level, sims in (("parts", ex.part_similarity), ("objects", ex.object_similarity))},
        "files": files,
    }
    atomic_write_json(out / files["json"], summary)
    write_report(out / files["html"], _html(ex, files, levels, ranges), title=f"labelwise explain: {ex.image_name}",
                 subtitle=f"CoCal run {ex.run_dir}")
    return summary


def explain_image(run_dir: str | Path, image: str | Path, out: str | Path, *, device: str = "auto",
                  max_side: int = 384, progress: bool = True, log: Callable[[str], None] | None = None,
                  loaded=None) -> dict[str, Any]:
    """``labelwise explain``: check the run (cocal, dictionary mode), load it, explain ``image``
    into ``out``. ``loaded``: an already loaded run (skips loading). Returns ``explain.json``'s dict
    with ``out`` and ``html`` added."""
    from labelwise.engine.api import load_run

    say = log or (lambda m: None)
    if max_side < 32:
        raise LabelwiseError(f"--max-side must be >= 32 pixels, got {max_side}")
    image, out = Path(image), Path(out)
    if not image.is_file():
        raise LabelwiseError(f"--image {image}: file not found; pass an image file (jpg, png, ...)")
    if out.exists() and not out.is_dir():
        raise LabelwiseError(f"--out {out}: exists and is not a folder; pass a folder path")
    if loaded is None:
        check_cocal_run(run_dir)
        loaded = load_run(run_dir, device)
    try:
        img = read_image(image)
    except LabelwiseError as e:
        raise LabelwiseError(f"--image {e}") from None
    dev = next(loaded.model.parameters()).device
    say(f"explain: cocal run {run_dir} ({loaded.model.num_parts} parts, {loaded.model.num_objects} objects) on "
        f"{image.name} ({img.shape[1]}x{img.shape[0]}), device {dev}")
    ex = compute_explanation(loaded, img, max_side=max_side, image_name=image.name)
    summary = write_explanation(ex, out, progress=progress)
    return {**summary, "out": str(out), "html": str(out / "index.html")}
