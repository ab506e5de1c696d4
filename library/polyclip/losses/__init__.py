"""Losses: one plain ``nn.Module`` per file, each tested against a naive reference."""

from polyclip.losses.ces import CESLoss
from polyclip.losses.cosine_embedding import CosineEmbeddingLoss
from polyclip.losses.hinge_rank import HingeRankLoss

__all__ = ["CESLoss", "CosineEmbeddingLoss", "HingeRankLoss"]
