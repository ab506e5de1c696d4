"""The method registry: ``method.name`` in a config -> its :class:`Recipe`."""

from jobs.recipes import distill, finetune, probe
from jobs.recipes.base import MethodParams, PrepareContext, Recipe

RECIPES: dict[str, Recipe] = {
    "probe": probe.RECIPE,
    "finetune": finetune.RECIPE,
    "semi": __import__("jobs.recipes.semi", fromlist=["RECIPE"]).RECIPE,
    "distill": distill.RECIPE,
    "simclr": __import__("jobs.recipes.simclr", fromlist=["RECIPE"]).RECIPE,
    "devise": __import__("jobs.recipes.devise", fromlist=["RECIPE"]).RECIPE,
    "clip_zeroshot": __import__("jobs.recipes.clip_zeroshot", fromlist=["RECIPE"]).RECIPE,
    "moe": __import__("jobs.recipes.moe", fromlist=["RECIPE"]).RECIPE,
}

__all__ = ["RECIPES", "MethodParams", "PrepareContext", "Recipe"]
