"""Cost control: run backbones cheapest first, stop once the partial ensemble is confident.

For each image, backbone ``k`` (in cost order) is called only if the adaptive ensemble of
backbones ``1..k-1`` (the prefix combiner, see :mod:`polyclip.ensemble.model`) has max
softmax probability below the threshold. Threshold 0 stops after the first backbone;
a threshold above 1 never stops early and uses every backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from polyclip.ensemble.model import Ensemble


@dataclass(frozen=True)
class CascadePoint:
    """One operating point of the cascade.

    Attributes:
        threshold: Stop when max softmax probability ``>= threshold``.
        accuracy: Test accuracy at that threshold.
        mean_calls: Mean number of backbones run per image (1 to ``n``).
    """

    threshold: float
    accuracy: float
    mean_calls: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def prefix_predictions(ensemble: Ensemble, features: Sequence[np.ndarray | torch.Tensor]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and confidence of every prefix ensemble, for offline cascade evaluation.

    Returns:
        ``(predictions (K, N), max_probabilities (K, N))`` for the ``K`` prefixes the ensemble
        supports, in increasing size.
    """
    tensors = [torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in features]
    preds, confs = [], []
    for k in ensemble.cascade_prefixes:
        logits, _ = ensemble.predict(tensors[:k])
        probs = torch.softmax(torch.from_numpy(logits), dim=1)
        conf, pred = probs.max(dim=1)
        preds.append(pred.numpy())
        confs.append(conf.numpy())
    return np.stack(preds), np.stack(confs)


def cascade_curve(ensemble: Ensemble, features: Sequence[np.ndarray | torch.Tensor], labels: np.ndarray,
                  thresholds: Sequence[float]) -> list[CascadePoint]:
    """Accuracy and mean backbone calls of the cascade at each threshold.

    Args:
        ensemble: An ensemble with prefix combiners (``fit_ensemble(..., cascade=True)``).
        features: Test features of every backbone, in cost order.
        labels: ``(N,)`` test labels.
        thresholds: Values of the stopping threshold.

    Returns:
        One :class:`CascadePoint` per threshold, in the order given.
    """
    prefixes = ensemble.cascade_prefixes
    if prefixes != list(range(1, ensemble.num_backbones + 1)):
        raise ValueError(f"the cascade needs a combiner for every prefix; this ensemble has {prefixes}")
    preds, confs = prefix_predictions(ensemble, features)
    y = np.asarray(labels)
    last = len(prefixes) - 1
    points = []
    for threshold in thresholds:
        confident = confs >= threshold
        confident[last] = True  # the full ensemble always answers
        stop = confident.argmax(axis=0)  # first prefix that is confident
        final = preds[stop, np.arange(len(y))]
        points.append(CascadePoint(float(threshold), float((final == y).mean()), float((stop + 1).mean())))
    return points


def choose_threshold(curve: Sequence[CascadePoint], max_accuracy_drop: float = 0.005,
                     reference_accuracy: float | None = None) -> CascadePoint:
    """The operating point with the fewest backbone calls within an accuracy budget.

    Args:
        curve: Output of :func:`cascade_curve`.
        max_accuracy_drop: Allowed loss against the reference, as a fraction (0.005 = half a point).
        reference_accuracy: Accuracy to stay close to; defaults to the curve point with the
            most calls (the full ensemble when the curve includes a threshold above 1).

    Returns:
        The cheapest admissible point; ties go to the higher accuracy, then the higher threshold.
    """
    if not curve:
        raise ValueError("empty cascade curve")
    if reference_accuracy is None:
        reference_accuracy = max(curve, key=lambda p: (p.mean_calls, p.accuracy)).accuracy
    admissible = [p for p in curve if p.accuracy >= reference_accuracy - max_accuracy_drop - 1e-12]
    if not admissible:
        raise ValueError(f"no threshold keeps accuracy within {max_accuracy_drop} of {reference_accuracy:.4f}")
    return min(admissible, key=lambda p: (p.mean_calls, -p.accuracy, -p.threshold))
