"""Metric accumulators and the ``evaluate`` entry point.

Accumulators (``update()`` / ``compute() -> dict`` / ``reset()``, reduced across ranks):
:class:`SemanticMetric`, :class:`PartsMetric`, :class:`UnsupervisedMetric`,
:class:`PanopticMetric`, :class:`InstanceEvaluator` (COCOeval). :func:`evaluate` scores a
prediction folder/file against a dataset spec (what ``labelwise evaluate`` runs).
"""

from labelwise.evaluation.api import KINDS, evaluate, run_evaluation
from labelwise.evaluation.base import Metric, jsonable
from labelwise.evaluation.instance import InstanceEvaluator
from labelwise.evaluation.panoptic import PanopticMetric
from labelwise.evaluation.parts import PartsMetric
from labelwise.evaluation.semantic import SemanticMetric
from labelwise.evaluation.unsupervised import UnsupervisedMetric

__all__ = ["KINDS", "evaluate", "run_evaluation", "Metric", "jsonable", "InstanceEvaluator", "PanopticMetric",
           "PartsMetric", "SemanticMetric", "UnsupervisedMetric"]
