"""``method.name: devise``: DeViSE under the zero-shot protocol (Frome et al., 2013).

A linear map from visual features into label word-vector space, trained on the seen
classes only and read out by ranked cosine look-up over *all* classes:

* ``prepare`` picks the unseen classes (``unseen_classes`` by name, or ``num_unseen``
  drawn with the job seed), drops their images from the labeled and validation
  streams, keeps the full test set, and resolves every class's word vector on the
  driver (workers never load GloVe);
* the task trains on the seen classes' vectors (unseen names never enter the loss)
  and predicts cosine scores over every class, so the job's ``metrics["test"]`` is
  generalised accuracy;
* ``report`` adds ``metrics["zero_shot"]``: unseen-only, seen-only and generalised
  accuracy, hit@1/3/5/10 over all classes, and the semantic similarity of the top-3
  predictions against a random-pair control (:mod:`polyclip.metrics.zero_shot`).

``finetune_backbone: false`` (default) trains on cached features of the frozen
backbone; ``true`` trains the backbone too, on images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from jobs.recipes.base import MethodParams, Payload, PrepareContext, Recipe, split_arrays
from polyclip.backbones import create_backbone
from polyclip.methods.devise import DeViSETask, GeneralisedDeViSE
from polyclip.metrics.zero_shot import choose_unseen, keep_seen, zero_shot_report
from polyclip.text import label_similarity_matrix, label_vectors, load_word_vectors


class DeViSEParams(MethodParams):
    name: Literal["devise"] = "devise"
    loss: Literal["hinge", "cosine"] = "hinge"
    margin: float = Field(0.1, gt=0, description="hinge rank margin (0.1 in DeViSE)")
    negatives: Literal["all", "sampled"] = "all"
    unseen_classes: list[str] = Field(default_factory=list, description="held-out class names (zero-shot protocol)")
    num_unseen: int = Field(0, ge=0, description="without names: this many unseen classes drawn with the job seed")
    finetune_backbone: bool = False
    standardize: bool = Field(False, description="z-score cached features with the seen training statistics")
    l2_normalize: bool = True


def _word_vector_options(cfg: Any) -> tuple[str, bool, dict[str, str]]:
    wv = cfg.word_vectors
    return (wv.source, wv.head_word, dict(wv.overrides)) if wv is not None else ("glove-6b-50d", False, {})


@dataclass(frozen=True)
class DeViSEExtras:
    """Which classes are held out of training, and every class's label vector ``(C, D)``."""

    unseen: list[int]
    seen: list[int]
    label_vectors: np.ndarray


def prepare(ctx: PrepareContext, params: DeViSEParams) -> Payload:
    names = list(ctx.dataset.class_names)
    unseen = choose_unseen(names, params.unseen_classes, params.num_unseen, ctx.cfg.seed)
    source, head_word, overrides = _word_vector_options(ctx.cfg)
    vectors = label_vectors(names, load_word_vectors(source), head_word=head_word, overrides=overrides)
    if params.finetune_backbone:
        payload = split_arrays(ctx, ctx.images)
    else:
        spec, size = ctx.cfg.backbone.spec, ctx.cfg.backbone.image_size
        payload = split_arrays(ctx, lambda s: ctx.features(spec, size, s))
    payload.train = keep_seen(payload.train, unseen)
    payload.val = keep_seen(payload.val, unseen)
    if params.standardize and not params.finetune_backbone:
        mean = payload.train["x"].mean(axis=0)
        std = payload.train["x"].std(axis=0) + 1e-6
        for split in (payload.train, payload.val, payload.test):
            split["x"] = ((split["x"] - mean) / std).astype(np.float32)
    payload.extras = DeViSEExtras(unseen=list(unseen), seen=[c for c in range(len(names)) if c not in unseen],
                                  label_vectors=np.asarray(vectors, dtype=np.float32))
    return payload


def build_task(cfg: Any, params: DeViSEParams, payload: Payload) -> GeneralisedDeViSE:
    extras: DeViSEExtras = payload.extras
    vectors = np.asarray(extras.label_vectors, dtype=np.float32)
    backbone = None
    if params.finetune_backbone:
        backbone = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size, in_chans=payload.in_chans)
    in_features = backbone.num_features if backbone is not None else payload.input_shape[0]
    task = DeViSETask(backbone, in_features, vectors[extras.seen], loss=params.loss, margin=params.margin,
                      negatives=params.negatives, freeze_backbone=not params.finetune_backbone,
                      l2_normalize=params.l2_normalize, seed=cfg.seed)
    return GeneralisedDeViSE(task, extras.seen, vectors)


def report(cfg: Any, params: DeViSEParams, payload: Payload, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``metrics["zero_shot"]``: the protocol numbers and the streams' per-class label counts."""
    names = payload.class_names
    similarity = label_similarity_matrix(payload.extras.label_vectors).numpy()
    out = zero_shot_report(arrays["test_logits"], arrays["test_labels"], names, payload.extras.unseen,
                           similarity=similarity, seed=cfg.seed)
    for stream in ("train", "val"):
        counts = np.bincount(payload.arrays(stream)["y"], minlength=len(names))
        out[f"{stream}_labels_per_class"] = {n: int(c) for n, c in zip(names, counts)}
    return {"zero_shot": out}


RECIPE = Recipe(params=DeViSEParams, prepare=prepare, build_task=build_task, report=report, extras=DeViSEExtras)
