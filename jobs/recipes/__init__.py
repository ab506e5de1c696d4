"""The method registry: ``method.name`` in a config -> its :class:`Recipe`."""

from jobs.recipes import finetune, probe
from jobs.recipes.base import MethodParams, PrepareContext, Recipe

RECIPES: dict[str, Recipe] = {
    "probe": probe.RECIPE,
    "finetune": finetune.RECIPE,
}

__all__ = ["RECIPES", "MethodParams", "PrepareContext", "Recipe"]
