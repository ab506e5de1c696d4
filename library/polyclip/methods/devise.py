"""DeViSE: map visual features into word-vector space and classify by ranked cosine look-up."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polyclip.backbones.base import Backbone
from polyclip.losses.cosine_embedding import CosineEmbeddingLoss
from polyclip.losses.hinge_rank import HingeRankLoss


class DeViSETask(nn.Module):
    """A linear map from visual features to label word vectors (Frome et al., 2013).

    Training pulls each image's mapped embedding towards its label's vector (hinge
    rank loss, or ``1 - cos``); prediction scores every label of the current class
    list by cosine similarity, so swapping the list (:meth:`set_label_vectors`)
    classifies unseen classes zero-shot, and the embedding (:meth:`embed`) can be
    looked up in an open vocabulary (:class:`polyclip.text.lookup.CosineLookup`).

    Args:
        backbone: The image encoder, or None when batches carry cached features.
        in_features: Visual feature dimension (``backbone.num_features`` with a backbone).
        label_vectors: ``(C, D)`` word vectors of the training classes.
        loss: ``"hinge"`` (:class:`HingeRankLoss`) or ``"cosine"`` (:class:`CosineEmbeddingLoss`).
        margin: Hinge margin (0.1 in DeViSE).
        negatives: Hinge negatives, ``"all"`` or ``"sampled"`` (one random wrong label).
        freeze_backbone: Keep the backbone fixed (and its BatchNorm statistics).
        l2_normalize: L2-normalise visual features before the map (robust across backbones).
        seed: Seed of the sampled negatives.

    Batch: ``x`` cached features ``(B, in_features)`` without a backbone, raw images
    ``uint8 (B, C, H, W)`` with one; ``y`` long ``(B,)`` indices into the training classes.

    Example:
        >>> task = DeViSETask(None, 512, torch.randn(10, 50))
        >>> out = task({"x": torch.randn(4, 512), "y": torch.tensor([0, 1, 2, 3])})
        >>> task.predict(torch.randn(4, 512)).shape
        torch.Size([4, 10])
    """

    label_vectors: torch.Tensor

    def __init__(self, backbone: Backbone | None, in_features: int, label_vectors: torch.Tensor | np.ndarray, *,
                 loss: str = "hinge", margin: float = 0.1, negatives: str = "all", freeze_backbone: bool = True,
                 l2_normalize: bool = True, seed: int = 0) -> None:
        super().__init__()
        if backbone is not None and backbone.num_features != in_features:
            raise ValueError(f"in_features={in_features} but the backbone gives {backbone.num_features}")
        vectors = _as_matrix(label_vectors)
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.l2_normalize = l2_normalize
        self.map = nn.Linear(in_features, vectors.shape[1])
        self.register_buffer("label_vectors", vectors)
        self.loss_fn: nn.Module
        if loss == "hinge":
            self.loss_fn = HingeRankLoss(margin=margin, negatives=negatives, seed=seed)
        elif loss == "cosine":
            self.loss_fn = CosineEmbeddingLoss()
        else:
            raise ValueError(f"DeViSE loss must be 'hinge' or 'cosine', got {loss!r}")
        if backbone is not None and freeze_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> DeViSETask:
        super().train(mode)
        if self.backbone is not None and self.freeze_backbone:
            self.backbone.eval()
        return self

    def set_label_vectors(self, label_vectors: torch.Tensor | np.ndarray) -> None:
        """Replace the class list (e.g. with unseen classes); ``(C', D)`` with the same ``D``."""
        vectors = _as_matrix(label_vectors)
        if vectors.shape[1] != self.map.out_features:
            raise ValueError(f"label vectors have dimension {vectors.shape[1]}, the map gives {self.map.out_features}")
        self.label_vectors = vectors.to(self.label_vectors.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Visual features of a batch: the backbone's on images, or ``x`` itself when cached."""
        if self.backbone is None:
            return x.float()
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone.encode(x)
        return self.backbone.encode(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted word-vector-space embeddings ``(B, D)`` (not normalised)."""
        feats = self.features(x)
        if self.l2_normalize:
            feats = F.normalize(feats, dim=1)
        return self.map(feats)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding to each current label vector, ``(B, C)``."""
        return F.normalize(self.embed(x), dim=1) @ F.normalize(self.label_vectors, dim=1).T

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embeddings = self.embed(batch["x"])
        loss = self.loss_fn(embeddings, batch["y"], self.label_vectors)
        with torch.no_grad():
            scores = F.normalize(embeddings, dim=1) @ F.normalize(self.label_vectors, dim=1).T
            acc = (scores.argmax(1) == batch["y"]).float().mean()
        return {"loss": loss, "acc": acc}


class GeneralisedDeViSE(nn.Module):
    """A :class:`DeViSETask` trained on the seen classes, scoring every class.

    Args:
        task: DeViSE task built with the seen classes' vectors.
        seen: Indices (in the full class list) of the seen classes, in the task's order.
        all_vectors: ``(C, D)`` vectors of every class, unseen ones included.

    Batch labels ``y`` index the full class list and must be seen classes; a batch
    holding an unseen class raises ``ValueError`` (the zero-shot split leaked).

    Example:
        >>> vectors = torch.randn(5, 8)
        >>> model = GeneralisedDeViSE(DeViSETask(None, 16, vectors[[0, 2, 4]]), [0, 2, 4], vectors)
        >>> model.predict(torch.randn(3, 16)).shape
        torch.Size([3, 5])
    """

    seen_position: torch.Tensor
    all_vectors: torch.Tensor

    def __init__(self, task: DeViSETask, seen: list[int], all_vectors: np.ndarray) -> None:
        super().__init__()
        self.task = task
        position = torch.full((len(all_vectors),), -1, dtype=torch.long)
        position[torch.tensor(seen)] = torch.arange(len(seen))
        self.register_buffer("seen_position", position)
        self.register_buffer("all_vectors", F.normalize(torch.as_tensor(all_vectors).float(), dim=1))

    @property
    def backbone(self) -> nn.Module | None:
        """The trained encoder (``None`` on cached features), for export."""
        return self.task.backbone

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = self.seen_position[batch["y"]]
        if bool((y < 0).any()):
            raise ValueError("a training batch holds an unseen class: the zero-shot split leaked")
        return self.task({**batch, "y": y})

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine scores over every class, ``(B, C)``."""
        return F.normalize(self.task.embed(x), dim=1) @ self.all_vectors.T


def _as_matrix(vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
    matrix = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors)
    matrix = matrix.detach().float().clone()
    if matrix.ndim != 2 or matrix.shape[0] < 1:
        raise ValueError(f"label vectors must be (C, D), got shape {tuple(matrix.shape)}")
    return matrix
