"""``method.name: moe``: a mixture of experts over superclasses, on cached features.

A gate picks the superclass, one expert per superclass picks the class within it
(:class:`polyclip.methods.moe.MixtureOfExpertsTask`); ``routing: hard`` (default) lets
the expert of the predicted superclass answer, ``soft`` takes the argmax of the product
``p(s|x) p(c|s,x)`` (a reparametrised flat softmax). The superclasses are

* given in the config, as lists of class names covering every class once, or
* derived in ``prepare`` (``auto_superclasses``) with ``k`` groups:
  ``vectors`` clusters the labels' word vectors (``word_vectors`` section), and
  ``confusion`` first fits a flat linear probe on the labeled features and clusters
  its confusion matrix on the validation images (classes it mixes up share a group).

``report`` adds ``metrics["moe"]``: the superclasses, how they were made, the
superclass-level test accuracy and the most-confused class pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from sklearn.metrics import confusion_matrix

from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe, split_arrays
from polyclip.methods.moe import (
    MixtureOfExpertsTask,
    assignment_from_names,
    fit_flat_probe,
    most_confused_pairs,
    superclasses_from_confusion,
    superclasses_from_vectors,
)


class MoEParams(MethodParams):
    name: Literal["moe"] = "moe"
    superclasses: list[list[str]] = Field(default_factory=list, description="class-name groups covering every class")
    auto_superclasses: Literal["vectors", "confusion"] | None = None
    k: int = Field(3, ge=1, description="number of superclasses to derive")
    hidden: int = Field(0, ge=0)
    depth: int = Field(1, ge=1)
    expert_weight: float = Field(1.0, gt=0)
    l2_normalize: bool = True
    routing: Literal["hard", "soft"] = Field(
        "hard", description="hard: the expert of the predicted superclass answers; soft: argmax of p(s|x) p(c|s,x)")
    probe_epochs: int = Field(200, gt=0, description="full-batch steps of the flat probe (confusion only)")
    probe_lr: float = Field(0.05, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> MoEParams:
        if bool(self.superclasses) == (self.auto_superclasses is not None):
            raise ValueError("give exactly one of superclasses (lists of class names) or auto_superclasses "
                             "(vectors | confusion)")
        return self


def derive_superclasses(params: MoEParams, class_names: list[str], payload: dict[str, Any], cfg: Any
                        ) -> tuple[list[int], dict[str, Any]]:
    """``(assignment, details)`` for the configured source of superclasses."""
    num = len(class_names)
    if params.superclasses:
        return assignment_from_names(params.superclasses, class_names), {"source": "config"}
    if params.auto_superclasses == "vectors":
        from polyclip.text import label_vectors, load_word_vectors

        wv = cfg.word_vectors
        source, head_word, overrides = (wv.source, wv.head_word, dict(wv.overrides)) if wv else ("glove-6b-50d",
                                                                                                False, {})
        vectors = label_vectors(class_names, load_word_vectors(source), head_word=head_word, overrides=overrides)
        return superclasses_from_vectors(vectors, params.k, seed=cfg.seed), {"source": f"vectors:{source}"}
    val = payload.val
    if len(val["y"]) == 0:
        raise ValueError("auto_superclasses=confusion clusters the flat probe's validation confusion matrix: "
                         "set data.val_per_class > 0")
    probe = fit_flat_probe(payload.train["x"], payload.train["y"], num, epochs=params.probe_epochs,
                           lr=params.probe_lr, seed=cfg.seed)
    with torch.no_grad():
        pred = probe.predict(torch.from_numpy(np.asarray(val["x"], dtype=np.float32))).argmax(1).numpy()
    cm = confusion_matrix(val["y"], pred, labels=np.arange(num))
    return superclasses_from_confusion(cm, params.k, seed=cfg.seed), {
        "source": "confusion", "flat_probe_val_top1": float((pred == val["y"]).mean()),
        "flat_probe_val_confusion": cm.tolist()}


@dataclass(frozen=True)
class MoEExtras:
    """The superclass of each class (the routing of the experts)."""

    superclass_of_class: list[int]


def prepare(ctx: PrepareContext, params: MoEParams) -> Payload:
    names = list(ctx.dataset.class_names)
    if params.auto_superclasses is not None and params.k > len(names):
        raise ValueError(f"k={params.k} superclasses for {len(names)} classes")
    spec, size = ctx.cfg.backbone.spec, ctx.cfg.backbone.image_size
    payload = split_arrays(ctx, lambda s: ctx.features(spec, size, s))
    assignment, details = derive_superclasses(params, names, payload, ctx.cfg)
    groups = [[names[c] for c in range(len(names)) if assignment[c] == s] for s in range(max(assignment) + 1)]
    payload.extras = MoEExtras(superclass_of_class=list(assignment))
    payload.report.update(superclasses=groups, **details)
    return payload


def build_task(cfg: Any, params: MoEParams, payload: Payload) -> MixtureOfExpertsTask:
    return MixtureOfExpertsTask(payload.input_shape[0], payload.extras.superclass_of_class, payload.num_classes,
                                params.hidden, depth=params.depth, expert_weight=params.expert_weight,
                                l2_normalize=params.l2_normalize, routing=params.routing)


def report(cfg: Any, params: MoEParams, payload: Payload, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``metrics["moe"]``: superclasses, their source, superclass accuracy, most-confused pairs."""
    names = payload.class_names
    logits, labels = arrays["test_logits"], arrays["test_labels"]
    superclass = np.asarray(payload.extras.superclass_of_class)
    pred = logits.argmax(1)
    cm = confusion_matrix(labels, pred, labels=np.arange(len(names)))
    out = dict(payload.report)
    out["routing"] = params.routing
    out["superclass_top1"] = float((superclass[pred] == superclass[labels]).mean())
    out["most_confused_pairs"] = [{"true": a, "predicted": b, "count": n}
                                  for a, b, n in most_confused_pairs(cm, names, n=10)]
    return {"moe": out}


RECIPE = Recipe(params=MoEParams, prepare=prepare, build_task=build_task, report=report, extras=MoEExtras)
