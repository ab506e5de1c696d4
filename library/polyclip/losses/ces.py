"""Cross-Entropy-Similarity (CES) loss: cross-entropy that charges less for semantically close mistakes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CESLoss(nn.Module):
    r"""Cross-entropy plus a penalty that grows with the word-vector distance of the mistake.

    From "Integrating Contrastive Language-Image Pretraining and Natural Language
    Similarity towards Robust Classification" (CES loss, Tiny-ImageNet). The paper
    writes its equation (1) as

    .. math::
        CES = 0.8\,\Big(-\frac{1}{m}\sum_{i=1}^m y_i \cdot \log \hat y_i\Big) * 0.2\,(1 - \mathrm{word2vec\_score})

    where ``word2vec_score`` is the similarity between the true and the predicted
    label. Taken literally that product is ``0.16 * CE * (1 - s)``: a correct
    prediction (``s = 1``) would cost nothing and the cross-entropy term could vanish.
    Two usable forms, with ``S`` the ``(C, C)`` label similarity matrix:

    * ``mode="hard"`` (default: the paper's product, made usable): the similarity of the
      argmax prediction scales each example's cross-entropy,

      ``L = mean_i CE_i * (w_ce + w_sim * (1 - S[y_i, argmax_c z_ic]))``

      so a correct prediction weighs ``w_ce`` and a mistake up to ``w_ce + 2 w_sim``
      (cosine can be negative). The weight is a constant for autograd (argmax has no
      gradient); the gradient flows through the cross-entropy.
    * ``mode="soft"`` (an option, fully differentiable; not the paper's equation):
      cross-entropy plus the expected semantic distance under the predicted distribution
      ``p = softmax(z)``,

      ``L = w_ce * mean_i CE_i + w_sim * mean_i sum_c p_ic (1 - S[y_i, c])``.

    The similarity matrix is a buffer computed once per job
    (:func:`polyclip.text.label_similarity_matrix`); the loss gathers rows of it on the
    device, never looking up word vectors per sample (the paper's per-sample CPU
    word2vec calls made 12 epochs take two days).

    Args:
        similarity: ``(C, C)`` label similarity ``S[i, j] = cos(v_i, v_j)``.
        w_ce: Weight of the cross-entropy term (0.8 in the paper).
        w_sim: Weight of the similarity term (0.2 in the paper).
        mode: ``"hard"`` (the paper's form) or ``"soft"`` (see above).

    Shapes:
        - logits: ``(B, C)``
        - target: ``(B,)`` long class indices
        - output: scalar

    Example:
        >>> S = torch.tensor([[1.0, 0.6, 0.1], [0.6, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> loss_fn = CESLoss(S, mode="soft")
        >>> loss = loss_fn(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0]))
        >>> loss.backward()
    """

    similarity: torch.Tensor

    def __init__(self, similarity: torch.Tensor, w_ce: float = 0.8, w_sim: float = 0.2, mode: str = "hard") -> None:
        super().__init__()
        if mode not in {"soft", "hard"}:
            raise ValueError(f"CESLoss mode must be 'soft' or 'hard', got {mode!r}")
        similarity = torch.as_tensor(similarity, dtype=torch.float32)
        if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
            raise ValueError(f"similarity must be a square (C, C) matrix, got shape {tuple(similarity.shape)}")
        self.register_buffer("similarity", similarity.clone())
        self.w_ce = w_ce
        self.w_sim = w_sim
        self.mode = mode

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.similarity.shape[0]:
            raise ValueError(f"logits have {logits.shape[1]} classes, the similarity matrix {self.similarity.shape[0]}")
        ce = F.cross_entropy(logits, target, reduction="none")
        distance = 1.0 - self.similarity[target]  # (B, C): 1 - S[y_i, c]
        if self.mode == "soft":
            expected = (logits.softmax(dim=1) * distance.to(logits.dtype)).sum(dim=1)
            return self.w_ce * ce.mean() + self.w_sim * expected.mean()
        pred = logits.detach().argmax(dim=1)
        weight = self.w_ce + self.w_sim * distance.gather(1, pred[:, None]).squeeze(1)
        return (ce * weight.to(ce.dtype)).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.similarity.shape[0]}, w_ce={self.w_ce}, w_sim={self.w_sim}, mode={self.mode!r}"
