"""Per-backbone classification heads: one representation for probes and zero-shot classifiers.

Every head is ``logits = logit_scale * normalize(x) @ weight.T + bias`` on L2-normalised
features, whether it was fitted on labels (:func:`fit_linear_probe`) or built from class
text embeddings (:func:`zero_shot_head`), so the ensemble and serving never branch on
where a head came from.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Head kinds recorded in the artifact.
HEAD_KINDS = ("probe", "zero_shot")


class LinearHead(nn.Module):
    """A linear classifier on L2-normalised features.

    ``logits = logit_scale * normalize(x) @ weight.T + bias``

    Args:
        weight: ``(C, D)`` class weights.
        bias: ``(C,)`` class biases (zeros for zero-shot heads).
        logit_scale: Multiplier of the cosine scores (CLIP's ``exp(logit_scale)``, about 100;
            1.0 for fitted probes, whose weights carry their own scale).
        kind: ``"probe"`` or ``"zero_shot"``; recorded, never branched on.

    Shapes:
        ``(B, D) -> (B, C)``.

    Example:
        >>> head = LinearHead(torch.eye(3, 4), torch.zeros(3), logit_scale=10.0)
        >>> head(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    logit_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, logit_scale: float = 1.0,
                 kind: str = "probe") -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"head weight must be (C, D), got shape {tuple(weight.shape)}")
        if bias is None:
            bias = torch.zeros(weight.shape[0])
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"head bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; valid: {', '.join(HEAD_KINDS)}")
        if not np.isfinite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale}")
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.kind = kind

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of raw (unnormalised) backbone features ``(B, D)``."""
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"head expects features of shape (B, {self.num_features}), got {tuple(x.shape)}")
        return self.logit_scale * F.normalize(x.float(), dim=1) @ self.weight.T + self.bias


def zero_shot_head(class_embeddings: torch.Tensor, logit_scale: float = 100.0) -> LinearHead:
    """A head from a ``(C, D)`` zero-shot weight matrix (e.g. CLIP class text embeddings).

    The rows are L2-normalised, so the logits are scaled cosine similarities as in CLIP.

    Args:
        class_embeddings: ``(C, D)``, one row per class (averaged prompt embeddings).
        logit_scale: CLIP's learned temperature, ``exp(logit_scale)`` (100 for OpenAI CLIP).
    """
    weight = F.normalize(class_embeddings.detach().float(), dim=1)
    return LinearHead(weight, torch.zeros(weight.shape[0]), logit_scale=logit_scale, kind="zero_shot")


def fit_linear_probe(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> LinearHead:
    """Multinomial logistic regression on L2-normalised features (full-batch L-BFGS).

    Minimises ``mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2`` (the bias is not penalised),
    the same objective as scikit-learn's ``LogisticRegression(C=1 / (l2 * N))``. The problem
    is convex and the start is zeros, so the result is deterministic and needs no seed.
    Works with one labeled image per class.

    Args:
        features: ``(N, D)`` raw backbone features.
        labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        num_classes: ``C``; every class needs at least one labeled image.
        l2: Ridge penalty on the weights; keeps one-shot probes finite.
        max_iter: L-BFGS iterations.

    Returns:
        A ``"probe"`` :class:`LinearHead` with ``logit_scale = 1``.

    Raises:
        ValueError: Shapes disagree, or a class has no labeled image (its bias would diverge).
    """
    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features (N, D) and labels (N,) expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    missing = sorted(set(range(num_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"cannot fit a probe: classes {missing} have no labeled image")
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearHead(weight.detach(), bias.detach(), logit_scale=1.0, kind="probe")
