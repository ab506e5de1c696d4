"""``fit_ensemble``: heads, combiners, evaluation and cascade from feature arrays in one call.

The plain-Python entry point the Ray job and the benchmark call after encoding (and
caching) each backbone's features.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from polyclip.ensemble.cascade import CascadePoint, cascade_curve, choose_threshold
from polyclip.ensemble.combiner import TemperatureCombiner, train_combiner
from polyclip.ensemble.evaluate import evaluate_ensemble
from polyclip.ensemble.heads import LinearHead, fit_linear_probe
from polyclip.ensemble.model import BackboneInfo, Ensemble
from polyclip.ensemble.protocol import resolve_protocol

#: Thresholds of the default cascade curve; 0 (first backbone only) and 1.01 (all) bracket it.
DEFAULT_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.999, 1.01)


@dataclass(frozen=True)
class ProtocolOptions:
    """Which labeled images fit the probes and which the combiner (the job's ``protocol:`` keys).

    Attributes:
        name: ``"auto"``, ``"split"`` or ``"shared"``; see :mod:`polyclip.ensemble.protocol`.
        combiner_fraction: Share of each class's labels for the combiner under ``"split"``.
    """

    name: str = "auto"
    combiner_fraction: float = 0.1


@dataclass(frozen=True)
class CascadeOptions:
    """The cost cascade fitted and evaluated with the ensemble (the job's ``cascade:`` keys).

    Attributes:
        enabled: Also train one combiner per prefix of the cost order, and trace the
            cascade curve on the validation and test features.
        thresholds: Thresholds of the cascade curve.
        max_accuracy_drop: Accuracy budget for picking the cascade threshold on validation
            data (fraction).
    """

    enabled: bool = True
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    max_accuracy_drop: float = 0.005


def fit_ensemble(
    features_train: Mapping[str, np.ndarray],
    y_train: np.ndarray,
    features_test: Mapping[str, np.ndarray] | None = None,
    y_test: np.ndarray | None = None,
    *,
    features_val: Mapping[str, np.ndarray] | None = None,
    y_val: np.ndarray | None = None,
    class_names: Sequence[str],
    backbones: Mapping[str, BackboneInfo] | None = None,
    zero_shot_heads: Mapping[str, LinearHead] | None = None,
    protocol: ProtocolOptions | None = None,
    probe_l2: float = 1e-3,
    hidden: int = 128,
    combine: str = "divide",
    positivity: str = "softplus",
    feature_norm: str = "l2",
    eps: float = 1e-3,
    steps: int = 500,
    lr: float = 2e-4,
    weight_decay: float = 0.01,
    batch_size: int | None = None,
    cascade: CascadeOptions | None = None,
    seed: int = 0,
) -> tuple[Ensemble, dict[str, object]]:
    """Fit the adaptive ensemble on labeled features and evaluate it against the baselines.

    Args:
        features_train: Backbone name -> ``(N, D_b)`` features of the labeled images, in
            cost order (cheapest first); every array has the same rows in the same order.
        y_train: ``(N,)`` labels.
        features_test: Same keys -> test features, for the evaluation and the reported
            cascade curve. Nothing is chosen on them.
        y_test: Test labels.
        features_val: Same keys -> validation features: the cascade threshold is chosen
            on these (the cheapest threshold within ``max_accuracy_drop`` of the full
            ensemble's validation accuracy). Without them no threshold is chosen.
        y_val: Validation labels.
        class_names: ``C`` class names (label ``i`` is ``class_names[i]``).
        backbones: Name -> :class:`BackboneInfo` (spec, image size, preprocessing) for the
            artifact; names missing here are recorded with ``spec = name`` and no image size.
        zero_shot_heads: Name -> a given head (e.g. :func:`zero_shot_head` of CLIP text
            embeddings); those backbones get no probe.
        protocol: The label protocol (default ``ProtocolOptions()``: ``"auto"``, 10% of
            each class's labels for the combiner).
        probe_l2: Ridge penalty of the linear probes.
        hidden, combine, positivity, feature_norm, eps: See :class:`TemperatureCombiner`.
        steps, lr, weight_decay, batch_size: See :func:`train_combiner`.
        cascade: The cost cascade (default ``CascadeOptions()``: enabled, default
            thresholds, 0.5% accuracy budget).
        seed: Seeds the protocol split, combiner initialisation and batch order.

    Returns:
        ``(ensemble, results)``; ``results`` holds the resolved protocol, the options, the
        final combiner losses, with validation data ``val_evaluation``, with test data
        ``evaluation`` (:func:`evaluate_ensemble`), and with either, when
        ``cascade.enabled``, ``cascade``: ``val_curve`` and ``chosen`` (the validation point of the chosen
        threshold, ``None`` without validation data, ``selected_on: "validation"``),
        ``curve`` and ``chosen_test`` (the test point at that threshold) with test data.
    """
    protocol = protocol or ProtocolOptions()
    cascade = cascade or CascadeOptions()
    names = list(features_train)
    if not names:
        raise ValueError("fit_ensemble needs features of at least one backbone")
    given = dict(zero_shot_heads or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"zero-shot heads for unknown backbones {unknown}; backbones: {names}")
    y = np.asarray(y_train, dtype=np.int64)
    num_classes = len(class_names)
    train = {name: np.asarray(features_train[name], dtype=np.float32) for name in names}
    for name, x in train.items():
        if x.ndim != 2 or x.shape[0] != len(y):
            raise ValueError(f"{name!r}: features must be (N={len(y)}, D), got {x.shape}")
    infos = [(backbones or {}).get(name) or BackboneInfo(name=name, spec=name, num_features=train[name].shape[1])
             for name in names]
    for info, name in zip(infos, names):
        if info.name != name or info.num_features != train[name].shape[1]:
            raise ValueError(f"backbone info {info} does not match features {name!r} of dim {train[name].shape[1]}")

    started = time.perf_counter()
    split = resolve_protocol(y, num_classes, protocol=protocol.name, fits_heads=len(given) < len(names),
                             combiner_fraction=protocol.combiner_fraction, seed=seed)
    heads = [given.get(name) or fit_linear_probe(train[name][split.head_indices], y[split.head_indices],
                                                 num_classes, l2=probe_l2) for name in names]
    comb_features = [torch.from_numpy(train[name][split.combiner_indices]) for name in names]
    comb_labels = torch.from_numpy(y[split.combiner_indices])
    with torch.no_grad():
        comb_logits = [head(x) for head, x in zip(heads, comb_features)]

    prefixes = list(range(1, len(names) + 1)) if cascade.enabled else [len(names)]
    combiners, final_losses = [], {}
    for k in prefixes:
        # fork_rng: seeded initialisation without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            combiner = TemperatureCombiner([x.shape[1] for x in comb_features[:k]], hidden=hidden, combine=combine,
                                           positivity=positivity, feature_norm=feature_norm, eps=eps)
        losses = train_combiner(combiner, comb_features[:k], comb_logits[:k], comb_labels, steps=steps, lr=lr,
                                weight_decay=weight_decay, batch_size=batch_size, seed=seed + k)
        combiners.append(combiner)
        final_losses[str(k)] = {"first": losses[0] if losses else None, "last": losses[-1] if losses else None}

    options = {"combine": combine, "positivity": positivity, "feature_norm": feature_norm, "eps": eps,
               "hidden": hidden, "steps": steps, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
               "probe_l2": probe_l2, "combiner_fraction": protocol.combiner_fraction, "seed": seed,
               "cascade_partial": "prefix_combiner" if cascade.enabled else None}
    metadata = {**split.describe(), "options": options, "n_train": len(y)}
    ensemble = Ensemble(infos, class_names, heads, combiners, metadata=metadata)
    results: dict[str, object] = {**split.describe(), "options": options, "backbones": names,
                                  "combiner_loss": final_losses, "fit_seconds": time.perf_counter() - started}

    val = _subset(features_val, y_val, names, "features_val", "y_val")
    test = _subset(features_test, y_test, names, "features_test", "y_test")
    curves: dict[str, list[CascadePoint]] = {}
    val_full: float | None = None
    for key, subset in (("val", val), ("test", test)):
        if subset is None:
            continue
        evaluation = evaluate_ensemble(ensemble, subset[0], subset[1])
        results["evaluation" if key == "test" else "val_evaluation"] = evaluation
        if key == "val":
            val_full = float(evaluation["accuracy"]["adaptive"])  # type: ignore[index]
        if cascade.enabled:
            curves[key] = cascade_curve(ensemble, subset[0], subset[1], cascade.thresholds)
    if curves:
        chosen = None
        if "val" in curves:
            # Selection reads validation data only; the test curve is reported, never consulted.
            chosen = choose_threshold(curves["val"], cascade.max_accuracy_drop, reference_accuracy=val_full)
        summary: dict[str, object] = {"selected_on": "validation", "max_accuracy_drop": cascade.max_accuracy_drop,
                                      "chosen": chosen.to_dict() if chosen else None,
                                      "reference_accuracy": val_full if chosen else None}
        if "val" in curves:
            summary["val_curve"] = [p.to_dict() for p in curves["val"]]
        if "test" in curves:
            summary["curve"] = [p.to_dict() for p in curves["test"]]
            summary["chosen_test"] = (next(p.to_dict() for p in curves["test"] if p.threshold == chosen.threshold)
                                      if chosen else None)
        results["cascade"] = summary
    return ensemble, results


def _subset(features: Mapping[str, np.ndarray] | None, labels: np.ndarray | None, names: list[str],
            what: str, labels_name: str) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Evaluation features in the ensemble's order, checked, or None when not given."""
    if features is None:
        if labels is not None:
            raise ValueError(f"{labels_name} given without {what}")
        return None
    if labels is None:
        raise ValueError(f"{what} given without {labels_name}")
    missing = [name for name in names if name not in features]
    if missing:
        raise ValueError(f"{what} lacks backbones {missing}")
    y = np.asarray(labels, dtype=np.int64)
    arrays = [np.asarray(features[name], dtype=np.float32) for name in names]
    for name, x in zip(names, arrays):
        if x.ndim != 2 or x.shape[0] != len(y):
            raise ValueError(f"{what}[{name!r}] must be (N={len(y)}, D), got {x.shape}")
    return arrays, y
