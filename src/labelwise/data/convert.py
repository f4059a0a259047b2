"""Official downloads -> the layouts the loaders read (``labelwise data convert KIND SRC OUT``).

``sbd``: the Semantic Boundaries Dataset (Hariharan et al. 2011, ``benchmark_RELEASE/``) into a
PASCAL VOC 2012 tree, the standard WSSS training set (``vocaug:``)::

    SRC/dataset/cls/<id>.mat     MATLAB struct GTcls, field Segmentation (H x W class indices)
    SRC/dataset/img/<id>.jpg
    SRC/dataset/{train,val}.txt  ids

    OUT (= the VOC2012 folder, holding JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)
      SegmentationClassAug/<id>.png   every SBD label (VOC palette); VOC's own labels are read
                                      from SegmentationClass/ for the ids SBD lacks
      JPEGImages/<id>.jpg             SBD images VOC lacks, copied
      ImageSets/Segmentation/train_aug.txt
                                      (SBD train + SBD val + VOC train) minus VOC val, sorted

With the full downloads this gives the usual 10,582 training ids.

``pascal-part``: the Pascal-Part annotations (Chen et al., "Detect What You Can", CVPR 2014;
``trainval/Annotations_Part/<id>.mat``) on the PASCAL VOC 2010 images, into the ``parts:``
layout::

    SRC/Annotations_Part/<id>.mat   MATLAB struct anno: objects(i).class (VOC name), .mask (H x W),
                                    objects(i).parts(j).part_name (e.g. 'leye', 'wheel_3'), .mask
    --images VOC2010/               JPEGImages/<id>.jpg, ImageSets/Main/{train,val}.txt

    OUT/images/{train,val}/<id>.jpg, OUT/parts/{train,val}/<id>.png, OUT/objects/{train,val}/<id>.png,
    OUT/hierarchy.json          (for --data pascalpart:OUT, which picks the pascalpart presets;
                                 parts:OUT reads it too)

``--parts 108`` (default) groups the fine parts into the 107 named parts of Pascal-Part-108
(Michieli et al., "GMNet", ECCV 2020; :data:`~labelwise.data.adapters.pascal_part.PASCAL_PART108`),
read from the names that table keeps: the left/right, front/back, upper/lower and numbered
variants of a part become the one part the table names (``lwing``/``rwing`` -> ``rwing``,
``door_1..n`` -> ``door``, every bus side -> ``rightside``); a part the table drops becomes the part
that holds it (animal eyes and person eyebrows -> ``head``, car mirrors -> ``rightside``, the
aeroplane's ``tail`` -> ``stern``); bicycle headlights, which no kept part holds, become ignore
(255). ``--parts fine`` keeps every official part (numbered instances merged: ``wheel_3`` ->
``wheel``). Objects without parts (boat, chair, dining table, sofa) are one part each; pixels of
an object that no part annotation covers are ignore (255) in the part map and the object in the
object map. The counts of ignored pixels are returned, never silently dropped.

Existing files are kept (a re-run completes an interrupted conversion); writes are atomic.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_text, write_label
from labelwise.utils import progress

__all__ = ["convert_sbd", "read_sbd_label", "convert_pascal_part", "read_pascal_part", "pascal_part_table",
           "CONVERTERS"]


def read_sbd_label(path: Path) -> np.ndarray:
    """The class-index map of one SBD ``cls/<id>.mat`` (``GTcls.Segmentation``), uint8."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as e:  # noqa: BLE001 -- scipy raises MatReadError and friends on a bad file
        raise LabelwiseError(f"{path}: not an SBD class file (expected a MATLAB struct GTcls with a Segmentation "
                             f"field: {e}); pass the benchmark_RELEASE folder of the SBD download") from None
    if seg.ndim != 2 or seg.size == 0 or seg.max() > 255:
        raise LabelwiseError(f"{path}: GTcls.Segmentation is not an H x W class-index map")
    return seg.astype(np.uint8)


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise LabelwiseError(f"{path}: id list not found")
    return [s.split()[0] for s in path.read_text().splitlines() if s.strip()]


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def convert_sbd(src: str | Path, out: str | Path, show_progress: bool = True) -> dict:
    """Write SBD's labels, images and ``train_aug.txt`` into the VOC 2012 folder ``out`` (see the
    module doc). Returns counts."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    ds = src / "dataset" if (src / "dataset").is_dir() else src
    if not (ds / "cls").is_dir():
        raise LabelwiseError(f"{src}: no dataset/cls/ folder; pass the benchmark_RELEASE folder of the SBD download")
    voc = out / "VOC2012" if (out / "VOC2012" / "JPEGImages").is_dir() else out
    sets = voc / "ImageSets" / "Segmentation"
    if not (voc / "JPEGImages").is_dir() or not (sets / "val.txt").is_file():
        raise LabelwiseError(f"{out}: not a VOC 2012 folder (JPEGImages/ and ImageSets/Segmentation/val.txt needed); "
                             "pass the VOC2012 folder of the VOCtrainval_11-May-2012 download")
    sbd_ids = sorted({*_ids(ds / "train.txt"), *_ids(ds / "val.txt")})
    aug = voc / "SegmentationClassAug"
    aug.mkdir(parents=True, exist_ok=True)
    written = copied = 0
    for i in progress(sbd_ids, desc="sbd labels") if show_progress else sbd_ids:
        dst = aug / f"{i}.png"
        if not dst.is_file():
            write_label(dst, read_sbd_label(ds / "cls" / f"{i}.mat"))
            written += 1
        img = voc / "JPEGImages" / f"{i}.jpg"
        if not img.is_file():
            src_img = ds / "img" / f"{i}.jpg"
            if not src_img.is_file():
                raise LabelwiseError(f"{src_img}: SBD image missing; the download is incomplete")
            _copy_atomic(src_img, img)
            copied += 1
    val = set(_ids(sets / "val.txt"))
    voc_train = _ids(sets / "train.txt") if (sets / "train.txt").is_file() else []
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - val)
    atomic_write_text(sets / "train_aug.txt", "".join(f"{i}\n" for i in train_aug))
    return {"sbd_ids": len(sbd_ids), "labels_written": written, "images_copied": copied,
            "train_aug": len(train_aug), "out": str(voc)}




# ---------------------------------------------------------------------------------------------
# Pascal-Part
# ---------------------------------------------------------------------------------------------

# official part names of each VOC object (Pascal-Part's part list; "_N" numbered instances omitted)
PASCAL_PART_FINE: dict[str, tuple[str, ...]] = {
    "aeroplane": ("body", "stern", "lwing", "rwing", "tail", "engine", "wheel"),
    "bicycle": ("fwheel", "bwheel", "saddle", "handlebar", "chainwheel", "headlight"),
    "bird": ("head", "leye", "reye", "beak", "torso", "neck", "lwing", "rwing", "lleg", "lfoot", "rleg", "rfoot",
             "tail"),
    "boat": (),
    "bottle": ("cap", "body"),
    "bus": ("frontside", "leftside", "rightside", "backside", "roofside", "leftmirror", "rightmirror", "fliplate",
            "bliplate", "door", "wheel", "headlight", "window"),
    "car": ("frontside", "leftside", "rightside", "backside", "roofside", "leftmirror", "rightmirror", "fliplate",
            "bliplate", "door", "wheel", "headlight", "window"),
    "cat": ("head", "leye", "reye", "lear", "rear", "nose", "torso", "neck", "lfleg", "lfpa", "rfleg", "rfpa", "lbleg",
            "lbpa", "rbleg", "rbpa", "tail"),
    "chair": (),
    "cow": ("head", "leye", "reye", "lear", "rear", "muzzle", "lhorn", "rhorn", "torso", "neck", "lfuleg", "lflleg",
            "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg", "tail"),
    "diningtable": (),
    "dog": ("head", "leye", "reye", "lear", "rear", "nose", "torso", "neck", "lfleg", "lfpa", "rfleg", "rfpa", "lbleg",
            "lbpa", "rbleg", "rbpa", "tail", "muzzle"),
    "horse": ("head", "leye", "reye", "lear", "rear", "muzzle", "lfho", "rfho", "lbho", "rbho", "torso", "neck",
              "lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg", "tail"),
    "motorbike": ("fwheel", "bwheel", "handlebar", "saddle", "headlight"),
    "person": ("head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth", "hair", "torso", "neck",
               "llarm", "luarm", "lhand", "rlarm", "ruarm", "rhand", "llleg", "luleg", "lfoot", "rlleg", "ruleg",
               "rfoot"),
    "pottedplant": ("pot", "plant"),
    "sheep": ("head", "leye", "reye", "lear", "rear", "muzzle", "lhorn", "rhorn", "torso", "neck", "lfuleg", "lflleg",
              "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg", "tail"),
    "sofa": (),
    "train": ("head", "hfrontside", "hleftside", "hrightside", "hbackside", "hroofside", "headlight", "coach",
              "cfrontside", "cleftside", "crightside", "cbackside", "croofside"),
    "tvmonitor": ("screen",),
}
_SIDES = ("frontside", "leftside", "rightside", "backside")
_LEGS_UL = ("lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg")
_ANIMAL4 = {"leye": "reye", "lear": "rear", **{k: "rfleg" for k in ("lfleg", "lbleg", "rbleg")},
            **{k: "rfpaw" for k in ("lfpa", "rfpa", "lbpa", "rbpa")}}
_HOOFED = {"leye": "head", "reye": "head", "lear": "rear", "lhorn": "rhorn", **{k: "rfuleg" for k in _LEGS_UL},
           **{k: "rfho" for k in ("lfho", "lbho", "rbho")}}
_VEHICLE = {**{k: "rightside" for k in _SIDES}, "leftmirror": "mirror", "rightmirror": "mirror",
            "bliplate": "fliplate"}
# fine part -> Pascal-Part-108 part (same name when absent); None: no kept part holds it -> ignore
_TO_108: dict[str, dict[str, str | None]] = {
    "aeroplane": {"lwing": "rwing", "tail": "stern"},
    "bicycle": {"bwheel": "fwheel", "headlight": None},
    "bird": {"leye": "head", "reye": "head", "lwing": "rwing", "lleg": "rleg", "lfoot": "rfoot"},
    "bus": dict(_VEHICLE),
    "car": {**_VEHICLE, "leftmirror": "rightside", "rightmirror": "rightside"},
    "cat": dict(_ANIMAL4),
    "cow": dict(_HOOFED),
    "dog": dict(_ANIMAL4),
    "horse": dict(_HOOFED),
    "motorbike": {"bwheel": "fwheel", "handlebar": "hbar", "headlight": "hlight"},
    "person": {"leye": "reye", "lear": "rear", "lebrow": "head", "rebrow": "head",
               **{k: "ruarm" for k in ("llarm", "luarm", "rlarm")}, "lhand": "rhand",
               **{k: "ruleg" for k in ("llleg", "luleg", "rlleg")}, "lfoot": "rfoot"},
    "sheep": dict(_HOOFED),
    "train": {**{"h" + k: "hrightside" for k in _SIDES}, **{"c" + k: "crightside" for k in _SIDES}},
}
_PREFIX_108 = {"aeroplane": "aero", "bicycle": "bike", "bird": "birds", "motorbike": "mbike",
               "pottedplant": "pplant", "tvmonitor": "tv"}
_NUMBERED = re.compile(r"_\d+$")


def pascal_part_table(kind: str = "108") -> tuple[list[tuple[str, str]], dict[tuple[str, str], int | None]]:
    """The part classes (``(name, object)``, index 1..) and the map ``(object, official part name)``
    -> part index (``None``: ignore) of a conversion (``kind`` ``108`` or ``fine``). Objects without
    parts map ``(object, "")`` to their single part."""
    from labelwise.data.adapters.pascal_part import PASCAL_PART108

    if kind not in ("108", "fine"):
        raise LabelwiseError(f"--parts {kind}: unknown part set; use 108 or fine")
    if kind == "108":
        parts = list(PASCAL_PART108)
        index = {p: k + 1 for k, p in enumerate(parts)}
        lookup: dict[tuple[str, str], int | None] = {}
        for obj, fine in PASCAL_PART_FINE.items():
            prefix = _PREFIX_108.get(obj, obj)
            if not fine:  # boat, chair, dining table, sofa: named by the object itself
                lookup[(obj, "")] = index[(obj if obj != "diningtable" else "dining table", obj)]
                continue
            for name in fine:
                target = _TO_108.get(obj, {}).get(name, name)
                if target is None:
                    lookup[(obj, name)] = None
                    continue
                key = (f"{prefix} {target}", obj)
                if key not in index:  # the table above must cover every fine part
                    raise AssertionError(f"Pascal-Part-108 has no part {key}")
                lookup[(obj, name)] = index[key]
        return parts, lookup
    parts, lookup = [], {}
    for obj, fine in PASCAL_PART_FINE.items():
        for name in fine or ("",):
            parts.append((f"{obj} {name}".strip(), obj))
            lookup[(obj, name)] = len(parts)
    return parts, lookup


def _records(value) -> list:
    """A MATLAB struct array as read by ``loadmat(squeeze_me=True)`` (one struct, an array of them
    or an empty array) -> list of structs."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return [v for v in value.ravel()]
    return [value]


def read_pascal_part(path: Path, lookup: dict[tuple[str, str], int | None]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Part and object index maps (uint8; 0 background, 255 ignore) of one ``Annotations_Part``
    file, with pixel counts of what became ignore: ``unmapped_part`` (a part the table drops with
    no holder), ``uncovered`` (object pixels no part covers)."""
    from scipy.io import loadmat

    from labelwise.data.voc import VOC_CLASSES

    try:
        anno = loadmat(str(path), squeeze_me=True, struct_as_record=False)["anno"]
        objects = _records(anno.objects)
    except Exception as e:  # noqa: BLE001 -- scipy raises MatReadError and friends on a bad file
        raise LabelwiseError(f"{path}: not a Pascal-Part annotation (expected a MATLAB struct anno with objects "
                             f"(class, mask, parts): {e}); pass the trainval/ folder of the Pascal-Part download") from None
    shape = None
    part_map = obj_map = None
    stats = {"unmapped_part": 0, "uncovered": 0}
    for o in objects:
        name = str(o.__dict__.get("class", "")).strip()
        if name not in PASCAL_PART_FINE:
            raise LabelwiseError(f"{path}: object class {name!r} is not a VOC class; the file is not Pascal-Part's")
        mask = np.asarray(o.mask).astype(bool)
        if shape is None:
            shape = mask.shape
            part_map = np.zeros(shape, np.uint8)
            obj_map = np.zeros(shape, np.uint8)
        if mask.shape != shape:
            raise LabelwiseError(f"{path}: object masks of different sizes ({shape} and {mask.shape})")
        obj_map[mask] = VOC_CLASSES.index(name)
        parts = _records(getattr(o, "parts", None))
        if not PASCAL_PART_FINE[name]:
            part_map[mask] = lookup[(name, "")]
            continue
        covered = np.zeros(shape, bool)
        painted = np.zeros(shape, np.uint8)
        for pt in parts:
            pname = _NUMBERED.sub("", str(pt.part_name).strip())
            if (name, pname) not in lookup:
                raise LabelwiseError(f"{path}: part {pt.part_name!r} of a {name} is not a Pascal-Part part name")
            pm = np.asarray(pt.mask).astype(bool) & mask
            target = lookup[(name, pname)]
            painted[pm] = 255 if target is None else target
            covered |= pm
        stats["unmapped_part"] += int((painted == 255).sum())
        stats["uncovered"] += int((mask & ~covered).sum())
        part_map[mask] = np.where(covered[mask], painted[mask], 255)
    if shape is None:
        raise LabelwiseError(f"{path}: no annotated objects")
    return part_map, obj_map, stats


def convert_pascal_part(src: str | Path, out: str | Path, images: str | Path | None = None, parts: str = "108",
                        show_progress: bool = True) -> dict:
    """Write Pascal-Part's annotations on the VOC 2010 images (``images``) as a ``parts:`` dataset in
    ``out`` (see the module doc). Returns counts."""
    from labelwise.io import atomic_write_json

    src, out = Path(src).expanduser(), Path(out).expanduser()
    ann = src / "Annotations_Part" if (src / "Annotations_Part").is_dir() else src
    if not any(ann.glob("*.mat")):
        raise LabelwiseError(f"{src}: no Annotations_Part/*.mat; pass the trainval/ folder of the Pascal-Part download")
    if images is None:
        raise LabelwiseError("pascal-part needs --images VOC2010 (the VOC2010 folder of VOCtrainval_03-May-2010, "
                             "with JPEGImages/ and ImageSets/Main/)")
    voc = Path(images).expanduser()
    voc = voc / "VOC2010" if (voc / "VOC2010" / "JPEGImages").is_dir() else voc
    if not (voc / "JPEGImages").is_dir():
        raise LabelwiseError(f"{voc}: no JPEGImages/; pass the VOC2010 folder of VOCtrainval_03-May-2010 to --images")
    table, lookup = pascal_part_table(parts)
    available = {p.stem for p in ann.glob("*.mat")}
    splits = {s: [i for i in _ids(voc / "ImageSets" / "Main" / f"{s}.txt") if i in available] for s in ("train", "val")}
    totals = {"unmapped_part": 0, "uncovered": 0, "written": 0, "kept": 0}
    for split, ids in splits.items():
        for d in ("images", "parts", "objects"):
            (out / d / split).mkdir(parents=True, exist_ok=True)
        for i in progress(ids, desc=f"pascal-part {split}") if show_progress else ids:
            dst_p, dst_o = out / "parts" / split / f"{i}.png", out / "objects" / split / f"{i}.png"
            if dst_p.is_file() and dst_o.is_file():
                totals["kept"] += 1
            else:
                part_map, obj_map, stats = read_pascal_part(ann / f"{i}.mat", lookup)
                write_label(dst_o, obj_map)
                write_label(dst_p, part_map)
                for k, v in stats.items():
                    totals[k] += v
                totals["written"] += 1
            img = out / "images" / split / f"{i}.jpg"
            if not img.is_file():
                src_img = voc / "JPEGImages" / f"{i}.jpg"
                if not src_img.is_file():
                    raise LabelwiseError(f"{src_img}: VOC 2010 image missing; the download is incomplete")
                _copy_atomic(src_img, img)
    from labelwise.data.voc import VOC_CLASSES

    atomic_write_json(out / "hierarchy.json", {"objects": list(VOC_CLASSES),
                                               "parts": [{"name": n, "object": o} for n, o in table]})
    return {"train": len(splits["train"]), "val": len(splits["val"]), "parts": len(table),
            "labels_written": totals["written"], "labels_kept": totals["kept"],
            "ignored_unmapped_part_px": totals["unmapped_part"], "ignored_uncovered_px": totals["uncovered"],
            "out": str(out)}


CONVERTERS = {"sbd": convert_sbd, "pascal-part": convert_pascal_part}
