"""What a method plugs into the generic job: its params, its data, its task.

A recipe is three plain functions and a params model; the job, the trainer and the
sweep never branch on the method name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from torch import nn

from polyclip.data.datasets import Dataset
from polyclip.data.splits import Split

#: Subsets a recipe can ask for.
SUBSETS = ("labeled", "unlabeled", "val", "test")


class MethodParams(BaseModel):
    """Base of every method's params: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


@dataclass
class PrepareContext:
    """What a recipe's ``prepare`` gets on the driver.

    Attributes:
        cfg: The validated job config (``jobs.config.JobConfig``).
        dataset: The loaded dataset.
        split: The seeded split.
        features: ``(backbone_spec, image_size, subset) -> float32 (N, D)``, cached on
            disk and encoded in parallel across the cluster on a miss.
    """

    cfg: Any
    dataset: Dataset
    split: Split
    features: Callable[[str, int | None, str], np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def indices(self, subset: str) -> np.ndarray:
        if subset not in SUBSETS:
            raise ValueError(f"unknown subset {subset!r}; valid: {SUBSETS}")
        return getattr(self.split, subset)

    def pool(self, subset: str):  # type: ignore[no-untyped-def]
        if subset == "test" and self.split.test_from == "test":
            assert self.dataset.test is not None
            return self.dataset.test
        return self.dataset.train

    def pool_size(self) -> int:
        """Images in the unlabeled pool (from ``data.unlabeled_source`` or carved out of the labeled data)."""
        size = getattr(self.dataset, "pool_size", None)
        return int(size(self.split)) if size is not None else len(self.split.unlabeled)

    def unlabeled(self, extra: dict[str, np.ndarray] | None = None, *, held_back_labels: bool = True) -> Any:
        """The unlabeled pool for a training stream: ``x``, ``y`` (held back, logged only) and ``extra`` columns.

        From a source (image folder, bucket, manifest, ``data.unlabeled_source``) it is a
        lazy ``jobs.streaming.StreamedSplit`` decoded in Ray Data tasks; from an in-memory
        dataset, a dict of arrays (the job turns it into a Ray Dataset block by block).
        Either way the Train workers stream it.
        """
        pool_split = getattr(self.dataset, "pool_split", None)
        if pool_split is not None:
            return pool_split(self.split, extra, held_back_labels=held_back_labels)
        labels = {"y": self.labels("unlabeled")} if held_back_labels else {}
        return {"x": self.images("unlabeled"), **labels, **(extra or {})}

    def images(self, subset: str) -> np.ndarray:
        """uint8 ``(N, C, H, W)`` images of a subset."""
        return self.pool(subset).images[self.indices(subset)]

    def labels(self, subset: str) -> np.ndarray:
        """Labels of a subset (for ``unlabeled`` they are held back: evaluation only)."""
        return self.pool(subset).labels[self.indices(subset)]


@dataclass(frozen=True)
class Recipe:
    """A method as the job layer sees it.

    Attributes:
        params: Pydantic model of ``method:`` (its ``name`` is a ``Literal``).
        prepare: Driver side: ``(ctx, params) -> payload`` with ``"train"``, ``"val"``,
            ``"test"`` (and optionally ``"unlabeled"``) dicts of aligned arrays (``"x"``,
            ``"y"``, ...), ``"class_names"`` and an ``"info"`` dict. Runs once; the
            payload goes to every worker through the object store.
        build_task: Worker side: ``(cfg, params, payload) -> task module``.
        streams: ``params -> {prefix: (payload key, batch-size multiplier)}``; the
            default trains on ``"train"`` alone.
        check: Optional cross-field validation ``(cfg, params) -> None`` raising
            ``ValueError``; runs when the config is parsed, before Ray starts.
        report: Optional, driver side after training: ``(cfg, params, payload, arrays)
            -> dict`` merged into ``metrics.json``; ``arrays`` holds the final
            ``test_logits``, ``test_labels``, ``val_logits``, ``val_labels``.
    """

    params: type[MethodParams]
    prepare: Callable[[PrepareContext, Any], dict[str, Any]]
    build_task: Callable[[Any, Any, dict[str, Any]], nn.Module]
    streams: Callable[[Any], dict[str, tuple[str, int]]] = lambda params: {"": ("train", 1)}
    report: Callable[[Any, Any, dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    check: Callable[[Any, Any], None] | None = None


def split_arrays(ctx: PrepareContext, x_of: Callable[[str], np.ndarray],
                 subsets: tuple[str, ...] = ("labeled", "val", "test")) -> dict[str, dict[str, np.ndarray]]:
    """Payload entries ``{"train"|"val"|"test"|"unlabeled": {"x", "y"}}`` for the given subsets."""
    names = {"labeled": "train"}
    return {names.get(s, s): {"x": x_of(s), "y": ctx.labels(s)} for s in subsets}
