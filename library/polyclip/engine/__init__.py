"""The one fit loop, its data streams, optimisers and schedules."""

from polyclip.engine.fit import Callback, EvalSet, FitResult, FitSettings, FitState, TaskData, fit, fit_arrays
from polyclip.engine.loop import evaluate
from polyclip.engine.optim import LARS, build_optimizer, build_scheduler
from polyclip.engine.streams import ArrayLoader

__all__ = [
    "LARS",
    "ArrayLoader",
    "Callback",
    "EvalSet",
    "FitResult",
    "FitSettings",
    "FitState",
    "TaskData",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "fit",
    "fit_arrays",
]
