"""Multi-stage work: recipes of resumable stages (``labelwise run RECIPE.yaml --out DIR``).

:mod:`.recipe` reads a recipe (stages with named outputs and references to earlier ones),
:mod:`.kinds` holds the stage kinds (``synth``, ``train``, ``infer``, ``evaluate``,
``pseudo-masks``), :mod:`.runner` runs them resumably, :mod:`.table` builds the comparison
table of the ``evaluate`` stages. Shipped recipes are in ``labelwise/recipes/`` (``recipes/``
at the repository root).
"""

from labelwise.stages.recipe import Recipe, Stage, load_recipe, shipped_recipes
from labelwise.stages.runner import run_recipe

__all__ = ["Recipe", "Stage", "load_recipe", "run_recipe", "shipped_recipes"]
