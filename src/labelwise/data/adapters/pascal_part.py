"""``pascalpart:ROOT`` — Pascal-Part-108 (part classes + background, 20 VOC objects).

Release layout (the segmentation-toolbox conversion distributed with the benchmark;
``img_dir``/``ann_dir`` per split)::

    ROOT/img_dir/{train,val}/<id>.{jpg,png}     (also ROOT/images/SPLIT, ROOT/JPEGImages/SPLIT)
    ROOT/ann_dir/{train,val}/<id>.png           part indices: 0 = background, 1..108, 255 = ignore
                                                (also ROOT/annotations/SPLIT, ROOT/parts/SPLIT)
    ROOT/objects/{train,val}/<id>.png           optional object maps (``labelwise data convert
                                                pascal-part`` writes them from the official
                                                object masks); without them, objects come
                                                from the parts

Part ``k`` belongs to the object named by its prefix (``aero`` -> aeroplane, ``mbike`` ->
motorbike, ...; :data:`PASCAL_PART108`); objects (``background`` + the 20 VOC classes) are
derived from the parts. Whole-object classes without parts (boat, chair, dining table, sofa)
are single "parts".
"""

from __future__ import annotations

from pathlib import Path

from labelwise.data.parts import ReleasePartsBase, hierarchy_arrays, pair_images_with_parts
from labelwise.data.spec import register_format
from labelwise.data.voc import VOC_CLASSES
from labelwise.errors import LabelwiseError

_PART_NAMES = (
    "aero body,aero stern,aero rwing,aero engine,aero wheel,bike fwheel,bike saddle,bike handlebar,"
    "bike chainwheel,birds head,birds beak,birds torso,birds neck,birds rwing,birds rleg,birds rfoot,birds tail,"
    "boat,bottle cap,bottle body,bus rightside,bus roofside,bus mirror,bus fliplate,bus door,bus wheel,"
    "bus headlight,bus window,car rightside,car roofside,car fliplate,car door,car wheel,car headlight,"
    "car window,cat head,cat reye,cat rear,cat nose,cat torso,cat neck,cat rfleg,cat rfpaw,cat tail,chair,"
    "cow head,cow rear,cow muzzle,cow rhorn,cow torso,cow neck,cow rfuleg,cow tail,dining table,dog head,"
    "dog reye,dog rear,dog nose,dog torso,dog neck,dog rfleg,dog rfpaw,dog tail,dog muzzle,horse head,"
    "horse rear,horse muzzle,horse torso,horse neck,horse rfuleg,horse tail,horse rfho,mbike fwheel,"
    "mbike hbar,mbike saddle,mbike hlight,person head,person reye,person rear,person nose,person mouth,"
    "person hair,person torso,person neck,person ruarm,person rhand,person ruleg,person rfoot,pplant pot,"
    "pplant plant,sheep head,sheep rear,sheep muzzle,sheep rhorn,sheep torso,sheep neck,sheep rfuleg,"
    "sheep tail,sofa,train head,train hrightside,train hroofside,train headlight,train coach,"
    "train crightside,train croofside,tv screen"
).split(",")
_PREFIX = {"aero": "aeroplane", "bike": "bicycle", "birds": "bird", "dining": "diningtable", "mbike": "motorbike",
           "pplant": "pottedplant", "tv": "tvmonitor"}
# (part name, object name) of parts 1..107: the class table of the public segmentation-toolbox
# release of Pascal-Part-108 lists 107 parts + background (108 entries). A ROOT/hierarchy.json
# (``parts:`` format schema) overrides this table, e.g. for a release with 108 named parts.
PASCAL_PART108 = [(n, _PREFIX.get(n.split()[0], n.split()[0])) for n in _PART_NAMES]
assert len(PASCAL_PART108) == 107 and {o for _, o in PASCAL_PART108} == set(VOC_CLASSES[1:])


def _first_dir(*cands: Path) -> Path | None:
    return next((c for c in cands if c.is_dir()), None)


@register_format("pascalpart")
class PascalPart108Dataset(ReleasePartsBase):
    """Pascal-Part-108 release (see module docstring)."""

    def __init__(self, root: str | Path, split: str = "train"):
        super().__init__(root, split)
        root = self.root
        if (root / "hierarchy.json").is_file():
            from labelwise.data.parts import load_hierarchy

            self._setup(*load_hierarchy(root / "hierarchy.json"))
        else:
            self._setup(*hierarchy_arrays(list(VOC_CLASSES), PASCAL_PART108, "Pascal-Part-108"))
        img_dir = _first_dir(root / "img_dir" / split, root / "images" / split, root / "JPEGImages" / split)
        ann_dir = _first_dir(root / "ann_dir" / split, root / "annotations" / split, root / "parts" / split)
        if img_dir is None or ann_dir is None:
            raise LabelwiseError(f"{root / 'img_dir' / split} / {root / 'ann_dir' / split}: split folders not "
                                 "found; point pascalpart: at the Pascal-Part-108 root (img_dir/, ann_dir/)")
        self.image_dir = img_dir
        self._images, self._parts = pair_images_with_parts(img_dir, ann_dir, (".jpg", ".jpeg", ".png"),
                                                           "restore the annotations")
        self.ids = list(self._images)
        self._objects: dict[str, Path] = {}
        obj_dir = root / "objects" / split
        if obj_dir.is_dir():
            self._objects = pair_images_with_parts(img_dir, obj_dir, (".jpg", ".jpeg", ".png"),
                                                   "restore the object maps or remove objects/")[1]

    def object_files(self, index: int) -> Path | None:
        return self._objects.get(self.ids[index])


__all__ = ["PascalPart108Dataset", "PASCAL_PART108"]
