"""CoCal: "Interpretable and Consistent Object Parsing via Dictionary Components, Contrastive
Calibration and Logical Constraints" -- ``labelwise train cocal``. Paper:
*Dictionary-based Framework for Interpretable and Consistent Object Parsing* (``docs/release-settings.md``) (Sec. 2, Eqs. 1-7, supplement Sec. 6).

=========================================  ====================================================
paper                                      code
=========================================  ====================================================
Eq. 4 k-means cross-attention               ``modeling.decoders.kmax.kmeans_cross_attention``
                                           (within each level: ``query_groups=[P, P~]``)
Sec. 2.1 dictionary C / Sec. 2.2.1 C~      ``methods.kmax.model.KMaXParser(dictionary=True)``:
                                           P part + P~ object components (incl. background),
                                           component i = class i, no class head, no void;
                                           ``fixed_match`` instead of Hungarian matching
C(y), C~(y): components of present classes ``method.present_components`` (final centres)
memory banks B, B~ (P x S x D)              ``method.CoCalState`` (``blocks.class_bank``)
Eq. 5 L_p_con, Eq. 6 L_o_con (hard neg. k)  ``blocks.dictionary_contrastive.dictionary_contrastive_loss``
Eq. 7 L_logic (cross-level)                 ``blocks.dictionary_contrastive.logic_loss``
total loss (supp. Sec. 6.1)                 ``method.CoCalMethod.training_step``
nearest-component inference                 ``methods.kmax.model.level_probabilities``
path-probability inference (Fig. 3)         ``logic.path_inference`` via ``CoCalMethod.parse``
Table 5: CoCal on Mask2Former               ``model.decoder=mask2former``:
                                           ``methods.kmax.model.Mask2FormerParser`` (components =
                                           the queries' mask kernels), ``blocks.mask2former_losses``
                                           (fixed matching; absent components are negatives)
=========================================  ====================================================

Switches (Table 2 rows): ``cocal.dictionary``, ``cocal.p_con``, ``cocal.o_con``, and the logical
constraints as two switches, ``cocal.logic_loss`` (Eq. 7, training) and ``cocal.path_inference``
(Fig. 3, inference), so Table 2's last row splits (all false = kMaX-DeepLab, the ``kmax`` method's
code path); Tables 3-4: ``cocal.bank_size`` (S), ``cocal.hard_negatives`` (k, 0 = all).

Where the paper is explicit the default follows it: Eqs. 5-7 use the dot product ``C(y)_i . B_j``
of the raw components (``cocal.similarity=dot``; the banks store them unnormalised; ``cosine``
normalises both) and sum over the present classes x in M (``cocal.reduction=sum``; ``mean``);
hard negatives are mined for Eqs. 5-6, where the paper introduces them (``cocal.logic_hard_negatives``
adds them to Eq. 7). Readings where the paper is silent: tau (``cocal.tau``, default 0.1); the
banks store the per-image final dictionary components of the classes present, enqueued after each
optimiser step; Eq. 5's denominator is the positives plus the k hardest negatives. Fig. 1's "and
vice versa" has no equation; ``cocal.logic_reverse`` gives it Eq. 7's form with the levels
swapped (object components against the part bank, positives = their parts), off by default.

The dictionary, bank, contrastive and logic pieces are decoder-agnostic (``blocks/``,
``logic.py``): they read the network's ``cluster_centres`` and per-level probabilities only, so
``model.decoder=mask2former`` runs the same method on Mask2Former (Table 5; L_kMaX is then
Mask2Former's own loss, weighted by ``cocal.w_kmax``).
"""

from labelwise.engine.registry import register_method
from labelwise.methods.cocal.config import CoCalConfig
from labelwise.methods.cocal.method import CoCalMethod, CoCalState

register_method(CoCalMethod)

__all__ = ["CoCalConfig", "CoCalMethod", "CoCalState"]
