"""The method registry: ``method.name`` in a config -> its :class:`Recipe`."""

from jobs.recipes import clip_zeroshot, devise, distill, finetune, moe, probe, semi, simclr
from jobs.recipes.base import MethodParams, PrepareContext, Recipe

RECIPES: dict[str, Recipe] = {
    "probe": probe.RECIPE,
    "finetune": finetune.RECIPE,
    "distill": distill.RECIPE,
    "semi": semi.RECIPE,
    "simclr": simclr.RECIPE,
    "devise": devise.RECIPE,
    "clip_zeroshot": clip_zeroshot.RECIPE,
    "moe": moe.RECIPE,
}

__all__ = ["RECIPES", "MethodParams", "PrepareContext", "Recipe"]
