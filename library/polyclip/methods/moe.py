"""Mixture of experts over superclasses: a gate picks the superclass, an expert the class within it.

Superclasses come from the labels' word vectors (:func:`superclasses_from_vectors`) or
from what a first model confuses (:func:`superclasses_from_confusion`). The class
probability factorises as ``p(c | x) = p(s(c) | x) * p(c | s(c), x)``.

Trained on that exact likelihood, the soft product is a reparametrised flat softmax (it
predicts what a flat head would). Hard routing, the default, sends each image to the
expert of its predicted superclass ``s* = argmax_s p(s | x)`` and answers
``argmax_c p(c | s*, x)``: the gate's decision is final, as in a hierarchical classifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polyclip.engine.fit import fit_arrays
from polyclip.methods.probe import ProbeTask, mlp_head

ROUTINGS = ("hard", "soft")
#: Under hard routing, classes outside the routed superclass keep this share of their soft probability.
HARD_FLOOR = 1e-6


def _relabel(assignment: np.ndarray) -> list[int]:
    """Number the groups by first appearance, so equal partitions give equal lists."""
    order: dict[int, int] = {}
    return [order.setdefault(int(a), len(order)) for a in assignment]


def superclasses_from_vectors(label_vectors: np.ndarray | torch.Tensor, k: int, seed: int = 0,
                              method: str = "kmeans") -> list[int]:
    """Group classes into ``k`` superclasses by their (cosine-normalised) label vectors.

    Args:
        label_vectors: ``(C, D)`` word vectors of the classes.
        k: Number of superclasses, ``1 <= k <= C``.
        seed: k-means seed.
        method: ``"kmeans"`` or ``"agglomerative"`` (average linkage on cosine distance).

    Returns:
        ``C`` superclass indices in ``[0, k)``, numbered by first appearance.
    """
    vectors = np.asarray(label_vectors.detach().cpu() if isinstance(label_vectors, torch.Tensor) else label_vectors,
                         dtype=np.float64)
    if not 1 <= k <= len(vectors):
        raise ValueError(f"k must be in [1, {len(vectors)}], got {k}")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        assignment = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(unit)
    elif method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        assignment = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(unit)
    else:
        raise ValueError(f"method must be 'kmeans' or 'agglomerative', got {method!r}")
    return _relabel(assignment)


def confusion_affinity(cm: np.ndarray) -> np.ndarray:
    """Symmetric confusion rate between classes: ``A[i, j] = (R[i, j] + R[j, i]) / 2``, zero diagonal.

    ``R`` is the row-normalised confusion matrix (rows: true class), so large and small
    classes count alike.
    """
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    rates = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    affinity = (rates + rates.T) / 2
    np.fill_diagonal(affinity, 0.0)
    return affinity


def superclasses_from_confusion(cm: np.ndarray, k: int, method: str = "agglomerative", seed: int = 0) -> list[int]:
    """Group classes that a model confuses with each other into ``k`` superclasses.

    Args:
        cm: ``(C, C)`` confusion matrix (rows: true, columns: predicted).
        k: Number of superclasses.
        method: ``"agglomerative"`` (average linkage on ``1 - affinity``) or
            ``"spectral"`` (spectral clustering of the affinity).
        seed: Spectral clustering seed.

    Returns:
        ``C`` superclass indices in ``[0, k)``, numbered by first appearance.
    """
    affinity = confusion_affinity(cm)
    if not 1 <= k <= len(affinity):
        raise ValueError(f"k must be in [1, {len(affinity)}], got {k}")
    if k == 1:
        return [0] * len(affinity)
    scale = affinity.max() if affinity.max() > 0 else 1.0
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        distance = 1.0 - affinity / scale
        np.fill_diagonal(distance, 0.0)
        assignment = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(
            distance)
    elif method == "spectral":
        from sklearn.cluster import SpectralClustering

        # A small floor keeps the graph connected when some classes are never confused.
        graph = affinity / scale + 1e-3
        np.fill_diagonal(graph, 1.0)
        assignment = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                        assign_labels="discretize").fit_predict(graph)
    else:
        raise ValueError(f"method must be 'agglomerative' or 'spectral', got {method!r}")
    return _relabel(assignment)


def most_confused_pairs(cm: np.ndarray, class_names: Sequence[str], n: int = 10,
                        symmetric: bool = False) -> list[tuple[str, str, int]]:
    """The ``n`` largest off-diagonal confusion counts.

    Args:
        cm: ``(C, C)`` confusion matrix (rows: true, columns: predicted).
        class_names: ``C`` names.
        n: Pairs to return.
        symmetric: Count ``cm[i, j] + cm[j, i]`` per unordered pair instead of ``true -> predicted``.

    Returns:
        ``(true, predicted, count)`` (or ``(a, b, count)`` when symmetric), largest first,
        zero counts left out; ties in row-major order.
    """
    counts = np.asarray(cm)
    if symmetric:
        counts = np.triu(counts + counts.T, k=1)
    else:
        counts = counts.copy()
        np.fill_diagonal(counts, 0)
    flat = np.argsort(-counts, axis=None, kind="stable")[:n]
    rows, cols = np.unravel_index(flat, counts.shape)
    return [(class_names[i], class_names[j], int(counts[i, j])) for i, j in zip(rows, cols) if counts[i, j] > 0]


def assignment_from_names(groups: list[list[str]], class_names: list[str]) -> list[int]:
    """Superclass index of every class from name groups.

    Args:
        groups: Lists of class names; group ``i`` is superclass ``i``.
        class_names: Every class name, in label order.

    Returns:
        The superclass of each class, in label order.

    Raises:
        ValueError: Unknown names, a class in two groups, or a class in none.
    """
    unknown = sorted({n for g in groups for n in g} - set(class_names))
    if unknown:
        raise ValueError(f"superclasses name unknown classes {unknown}; valid: {class_names}")
    flat = [n for g in groups for n in g]
    twice = sorted({n for n in flat if flat.count(n) > 1})
    missing = [n for n in class_names if n not in flat]
    if twice or missing or any(not g for g in groups):
        raise ValueError(f"superclasses must put every class in exactly one non-empty group; "
                         f"in several: {twice}, in none: {missing}")
    where = {n: i for i, g in enumerate(groups) for n in g}
    return [where[n] for n in class_names]


def fit_flat_probe(x: np.ndarray, y: np.ndarray, num_classes: int, *, epochs: int, lr: float,
                   seed: int) -> ProbeTask:
    """A linear probe trained full batch by the generic loop (the 'first model' of the confusion route).

    Its validation confusion matrix feeds :func:`superclasses_from_confusion`.

    Args:
        x: ``(N, D)`` features.
        y: ``(N,)`` labels in ``[0, num_classes)``.
        num_classes: Number of classes.
        epochs: Full-batch steps.
        lr: Adam learning rate.
        seed: Seeds the initialisation and the loop.

    Returns:
        The trained probe, in eval mode.
    """
    torch.manual_seed(seed)
    task = ProbeTask(x.shape[1], num_classes)
    fit_arrays(task, {"x": x, "y": y}, epochs=epochs, optimizer="adam", lr=lr, weight_decay=1e-4,
               scheduler="constant", seed=seed)
    return task.eval()


class MixtureOfExpertsTask(nn.Module):
    """A gate over superclasses and one expert head per superclass, on features.

    ``log p(c | x) = log_softmax(gate(x))[s(c)] + log_softmax(expert_{s(c)}(x))[c]``.
    Training minimises cross-entropy of the gate on the true superclass plus
    ``expert_weight`` times cross-entropy of the true superclass's expert on the class
    (the same for both routings). A superclass of a single class has an expert that is
    always right (zero loss).

    :meth:`predict` returns class log-probabilities:

    * ``soft``: ``log p(c | x)`` above (normalised).
    * ``hard``: the routed distribution ``p(c | s*, x)`` on the classes of the predicted
      superclass ``s* = argmax_s p(s | x)``; every other class keeps
      ``log p(c | x) + log(HARD_FLOOR)``, so the argmax is always inside ``s*`` while
      the cross-entropy of a misrouted image stays finite.

    Args:
        in_features: Feature dimension ``D``.
        superclass_of_class: ``C`` superclass indices; every index in ``[0, K)`` used.
        num_classes: ``C``.
        hidden: Hidden width of the gate and expert MLPs (0 = linear heads).
        depth: Linear layers per head.
        expert_weight: Weight of the expert loss.
        l2_normalize: L2-normalise features first.
        routing: ``"hard"`` (to the expert of the predicted superclass) or ``"soft"``.

    Batch: ``x`` float ``(B, D)``, ``y`` long ``(B,)``.

    Example:
        >>> task = MixtureOfExpertsTask(16, [0, 0, 1, 1, 1], 5)
        >>> task.predict(torch.randn(3, 16)).exp().sum(1)  # doctest: +SKIP
        tensor([1., 1., 1.])
    """

    superclass_of_class: torch.Tensor
    position_in_superclass: torch.Tensor
    _column_of_class: torch.Tensor

    def __init__(self, in_features: int, superclass_of_class: Sequence[int], num_classes: int, hidden: int = 0, *,
                 depth: int = 1, expert_weight: float = 1.0, l2_normalize: bool = True,
                 routing: str = "hard") -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.routing = routing
        assignment = [int(s) for s in superclass_of_class]
        if len(assignment) != num_classes:
            raise ValueError(f"superclass_of_class has {len(assignment)} entries for {num_classes} classes")
        num_super = max(assignment) + 1
        if min(assignment) < 0 or set(assignment) != set(range(num_super)):
            raise ValueError(f"superclass indices must cover 0..{num_super - 1} with none empty, got {assignment}")
        self.num_classes = num_classes
        self.num_superclasses = num_super
        self.members = [[c for c in range(num_classes) if assignment[c] == s] for s in range(num_super)]
        position = [0] * num_classes
        for members in self.members:
            for i, c in enumerate(members):
                position[c] = i
        self.register_buffer("superclass_of_class", torch.tensor(assignment, dtype=torch.long))
        self.register_buffer("position_in_superclass", torch.tensor(position, dtype=torch.long))
        # Class index -> its column among the concatenated expert outputs.
        order = [c for m in self.members for c in m]
        self.register_buffer("_column_of_class", torch.tensor(np.argsort(order), dtype=torch.long))
        depth = depth if hidden > 0 else 1
        self.gate = mlp_head(in_features, num_super, hidden, depth)
        self.experts = nn.ModuleList(mlp_head(in_features, len(m), hidden, depth) for m in self.members)
        self.expert_weight = expert_weight
        self.l2_normalize = l2_normalize

    def _log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(s | x) (B, K), log p(c | s(c), x) (B, C))``."""
        x = x.float()
        if self.l2_normalize:
            x = F.normalize(x, dim=1)
        gate = self.gate(x).log_softmax(dim=1)
        within = torch.cat([expert(x).log_softmax(dim=1) for expert in self.experts], dim=1)
        return gate, within[:, self._column_of_class]

    def _combine(self, gate: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities of the configured routing from gate and expert log-probabilities."""
        soft = gate[:, self.superclass_of_class] + expert
        if self.routing == "soft":
            return soft
        routed = self.superclass_of_class[None, :] == gate.argmax(dim=1, keepdim=True)
        return torch.where(routed, expert, soft + math.log(HARD_FLOOR))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        gate, expert = self._log_probs(x)
        return self._combine(gate, expert)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = batch["y"]
        gate, expert = self._log_probs(batch["x"])
        gate_loss = -gate.gather(1, self.superclass_of_class[y][:, None]).mean()
        expert_loss = -expert.gather(1, y[:, None]).mean()
        with torch.no_grad():
            logits = self._combine(gate, expert)
            acc = (logits.argmax(1) == y).float().mean()
            gate_acc = (gate.argmax(1) == self.superclass_of_class[y]).float().mean()
        return {"loss": gate_loss + self.expert_weight * expert_loss, "acc": acc, "gate_loss": gate_loss.detach(),
                "expert_loss": expert_loss.detach(), "gate_acc": gate_acc}


__all__ = [
    "HARD_FLOOR",
    "ROUTINGS",
    "MixtureOfExpertsTask",
    "assignment_from_names",
    "confusion_affinity",
    "fit_flat_probe",
    "most_confused_pairs",
    "superclasses_from_confusion",
    "superclasses_from_vectors",
]
