"""What a method plugs into the generic job: its params, its data, its task.

A recipe is three plain functions and a params model; the job, the trainer and the
sweep never branch on the method name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from jobs.config_base import StrictModel
from polyclip.data.datasets import Dataset
from polyclip.data.splits import Split

#: Subsets a recipe can ask for.
SUBSETS = ("labeled", "unlabeled", "val", "test")
#: The payload's splits: ``train`` (the labeled images), ``val``, ``test`` and the ``unlabeled`` pool.
SPLITS = ("train", "val", "test", "unlabeled")

#: A split held as aligned arrays: ``x`` (images or features), ``y``, and per-method columns.
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Streamed:
    """What stays in a payload of a split that reaches the workers as a Ray Dataset: its row count."""

    num_rows: int


@dataclass
class Payload:
    """The recipe-to-worker contract: what a recipe's ``prepare`` hands to every Train worker.

    Attributes:
        train: The labeled training split (arrays; a large one becomes a stream).
        val: The validation split (selection, plateau, early stopping); may be empty.
        test: The test split, evaluated after training.
        unlabeled: The pool, for methods that use one: arrays or a
            ``jobs.streaming.StreamedSplit`` on the driver, a :class:`Streamed` row count
            once the job has turned it into a Ray Dataset.
        class_names: Class names in label order.
        input_shape: Shape of one training input (``(C, H, W)`` images, ``(D,)``
            features): tasks size their first layer from it, streamed or not.
        extras: The method's own typed facts for ``build_task`` (the recipe's
            ``Recipe.extras`` dataclass), e.g. the resolved teacher or the label vectors.
        report: Driver-side facts for ``metrics.json`` (never needed by the workers).
    """

    train: Arrays | Any
    val: Arrays
    test: Arrays
    unlabeled: Arrays | Any | None = None
    class_names: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    extras: Any = None
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.input_shape and isinstance(self.train, dict) and "x" in self.train:
            self.input_shape = tuple(int(d) for d in np.shape(self.train["x"])[1:])

    def split(self, name: str) -> Arrays | Any:
        """A split by name (``train``, ``val``, ``test``, ``unlabeled``)."""
        if name not in SPLITS:
            raise KeyError(f"unknown payload split {name!r}; valid: {SPLITS}")
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"the payload has no {name!r} split (the recipe's prepare did not set it)")
        return value

    def set_split(self, name: str, value: Arrays | Any) -> None:
        if name not in SPLITS:
            raise KeyError(f"unknown payload split {name!r}; valid: {SPLITS}")
        setattr(self, name, value)

    def arrays(self, name: str) -> Arrays:
        """A split's arrays; a clear error when it is streamed."""
        value = self.split(name)
        if not isinstance(value, dict):
            raise TypeError(f"payload split {name!r} is streamed ({type(value).__name__}), not arrays")
        return value

    @property
    def in_chans(self) -> int:
        """Channels of the training images (the first axis of :attr:`input_shape`)."""
        if not self.input_shape:
            raise ValueError("the payload has no input_shape (no training images to read it from)")
        return int(self.input_shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class MethodParams(StrictModel):
    """Base of every method's params: unknown keys are errors."""

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
        prepare: Driver side: ``(ctx, params) -> Payload``. Runs once; the small splits
            go to every worker through the object store, the pool as a Ray Dataset.
        build_task: Worker side: ``(cfg, params, payload) -> task module``; ``None`` for
            an evaluation-only method (nothing to train), which names its job in
            ``evaluated_by`` instead.
        streams: ``params -> {prefix: (payload split, batch-size multiplier)}``; the
            default trains on ``"train"`` alone.
        extras: The type of ``Payload.extras`` this recipe's ``prepare`` sets (checked by
            the job), or ``None`` when it needs none.
        check: Optional cross-field validation ``(cfg, params) -> None`` raising
            ``ValueError``; runs when the config is parsed, before Ray starts.
        report: Optional, driver side after training: ``(cfg, params, payload, arrays)
            -> dict`` merged into ``metrics.json``; ``arrays`` holds the final
            ``test_logits``, ``test_labels``, ``val_logits``, ``val_labels``.
        evaluated_by: The module that runs an evaluation-only method
            (``"jobs.zeroshot_eval"``); ``jobs.train`` refuses such a method before it
            loads any data.

    Raises:
        TypeError: Both or neither of ``build_task`` and ``evaluated_by``.
    """

    params: type[MethodParams]
    prepare: Callable[[PrepareContext, Any], Payload]
    build_task: Callable[[Any, Any, Payload], nn.Module] | None
    streams: Callable[[Any], dict[str, tuple[str, int]]] = lambda params: {"": ("train", 1)}
    report: Callable[[Any, Any, Payload, dict[str, Any]], dict[str, Any]] | None = None
    check: Callable[[Any, Any], None] | None = None
    extras: type | None = None
    evaluated_by: str | None = None

    def __post_init__(self) -> None:
        if (self.build_task is None) == (self.evaluated_by is None):
            raise TypeError(f"{self.params.__name__}: a recipe has a build_task (a method jobs.train trains) or "
                            "evaluated_by (the job of an evaluation-only method), exactly one of them")

    @property
    def trainable(self) -> bool:
        """Whether ``jobs.train`` can train this method (it has a ``build_task``)."""
        return self.build_task is not None

    def check_payload(self, payload: Payload) -> None:
        """Raise ``TypeError`` when ``prepare`` broke the contract (a wrong type, or extras of the wrong kind)."""
        if not isinstance(payload, Payload):
            raise TypeError(f"{self.params.__name__}: prepare returned {type(payload).__name__}, not a Payload")
        if self.extras is None and payload.extras is not None:
            raise TypeError(f"{self.params.__name__}: prepare set extras {type(payload.extras).__name__} but the "
                            "recipe declares none")
        if self.extras is not None and not isinstance(payload.extras, self.extras):
            raise TypeError(f"{self.params.__name__}: extras must be {self.extras.__name__}, got "
                            f"{type(payload.extras).__name__}")


def split_arrays(ctx: PrepareContext, x_of: Callable[[str], np.ndarray]) -> Payload:
    """A payload of the labeled, validation and test splits as arrays ``{"x": x_of(subset), "y"}``."""
    train, val, test = ({"x": x_of(s), "y": ctx.labels(s)} for s in ("labeled", "val", "test"))
    return Payload(train=train, val=val, test=test, class_names=list(ctx.dataset.class_names))
