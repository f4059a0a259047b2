"""Config of ``cocal``: kMaX-DeepLab's (``methods.kmax.config``) + the ``cocal`` section.

The switches are the rows of CoCal's Table 2 (all false = kMaX-DeepLab; the logical constraints
are two switches, ``logic_loss`` for training and ``path_inference`` for inference, so the last
row can be split); ``bank_size`` (S) and
``hard_negatives`` (k) are Tables 3 and 4. Weights: lambda_p_con = 2, lambda_o_con = 2,
lambda_logic = 1, lambda_kMaX = 1 (the official kMaX weights inside L_kMaX); supplement Sec. 6.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from labelwise.config import param
from labelwise.errors import LabelwiseError
from labelwise.methods.kmax.config import KMaXConfig


@dataclass
class CoCalSection:
    RENAMED: ClassVar[dict[str, str]] = {
        "logic": "cocal.logic_loss (L_logic, training) and cocal.path_inference (inference); set both"}

    dictionary: bool = param(True, help="dictionary components (Sec. 2.1): one cluster centre per part class and "
                                        "per object class, fixed component <-> class map, nearest-component "
                                        "inference (false = kMaX-DeepLab's free queries + Hungarian matching)")
    p_con: bool = param(True, help="part-level contrastive loss L_p_con (Eq. 5)")
    o_con: bool = param(True, help="object-level contrastive loss L_o_con (Eq. 6)")
    logic_loss: bool = param(True, help="logical constraints, training (Sec. 2.2.3): the cross-level contrastive "
                                        "loss L_logic (Eq. 7), part components towards their parent object's")
    path_inference: bool = param(True, help="logical constraints, inference (Sec. 2.2.3, Fig. 3): each pixel takes the "
                                            "best part -> object path (part x parent-object probability), so the part "
                                            "and object maps agree; false = an independent argmax per level")
    logic_reverse: bool = param(False, help="Fig. 1's 'and vice versa': also pull each object component towards its "
                                            "parts' stored components (Eq. 7 with the levels swapped; the paper gives "
                                            "no equation for it)")
    bank_size: int = param(100, range=(1, None), help="S: stored samples per class in each memory bank (Table 3: 100)")
    hard_negatives: int = param(100, range=(0, None),
                                help="k: hard negatives per anchor, the most similar entries of other classes "
                                     "(Table 4: 100; 0 = all negatives)")
    logic_hard_negatives: bool = param(False, help="hard-negative mining in Eq. 7 too (the paper mines them for "
                                                   "Eqs. 5-6 only)")
    similarity: str = param("dot", choices=("dot", "cosine"),
                            help="C(y)_i . B_j of Eqs. 5-7: the paper's dot product of the raw components (the banks "
                                 "store them as they are), or cosine (components and banks L2-normalised)")
    reduction: str = param("sum", choices=("sum", "mean"),
                           help="over the present classes x in M: the paper's sum, or the mean")
    tau: float = param(0.1, range=(1e-4, None), help="temperature of Eqs. 5-7 (not given in the paper)")
    w_kmax: float = param(1.0, range=(0.0, None), help="lambda_kMaX (the official setting: 1)")
    w_p_con: float = param(2.0, range=(0.0, None), help="lambda_p_con (2)")
    w_o_con: float = param(2.0, range=(0.0, None), help="lambda_o_con (2)")
    w_logic: float = param(1.0, range=(0.0, None), help="lambda_logic (1)")

    def validate(self) -> None:
        keys = ("p_con", "o_con", "logic_loss", "logic_reverse", "path_inference")
        if not self.dictionary and any(getattr(self, k) for k in keys):
            on = [k for k in keys if getattr(self, k)]
            raise LabelwiseError(f"config keys cocal.{', cocal.'.join(on)} need cocal.dictionary=true: the contrastive "
                                 "terms and the logic act on class-aligned dictionary components")


@dataclass
class CoCalConfig(KMaXConfig):
    cocal: CoCalSection = field(default_factory=CoCalSection)
