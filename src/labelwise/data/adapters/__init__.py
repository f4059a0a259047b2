"""Adapters that load official dataset releases in their own layout (registered as formats).

=================  ==============================================================
format             release
=================  ==============================================================
``vocaug:ROOT``    PASCAL VOC 2012 + SBD augmentation (``SegmentationClassAug``,
                   ``train_aug`` list of 10,582 images) — :mod:`.voc_aug`
``coco-wsss:ROOT`` COCO 2014 for WSSS (label PNGs, 80 classes as 1..80) — :mod:`.coco_wsss`
``partimagenet:``  PartImageNet (``PartImageNet_Seg`` release) — :mod:`.partimagenet`
``pascalpart:``    Pascal-Part-108 (108 parts, 20 objects) — :mod:`.pascal_part`
``cityscapes:``    Cityscapes (``leftImg8bit/`` + ``gtFine/``; 19 classes, instances,
                   panoptic) — :mod:`.cityscapes`
=================  ==============================================================
"""

from labelwise.data.adapters import cityscapes, coco_wsss, partimagenet, pascal_part, voc_aug  # noqa: F401  (registers)
