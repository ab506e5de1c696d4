"""The served ensemble: per-backbone heads plus one adaptive combiner per cascade prefix.

Serving encodes an image with each backbone itself (one deployment per backbone) and
calls :meth:`Ensemble.forward` on the gathered features; nothing here touches images.

Cascade (cost control): backbones are kept in cost order, and the ensemble holds one
combiner per prefix ``1..n`` of that order, each trained exactly like the full one but
reading only the backbones seen so far. ``forward(features[:k])`` is then the adaptive
ensemble of the first ``k`` backbones, a real model rather than the full combiner fed
zeros for features it never saw in training (out of distribution) or a plain average.
With ``k = 1`` the "ensemble" is the cheapest head with a learned per-image temperature:
the same prediction, recalibrated confidence, which is what the stopping rule reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np
import torch
from torch import nn

from polyclip.backbones.base import Backbone, Preprocessing
from polyclip.ensemble.combiner import TemperatureCombiner
from polyclip.ensemble.heads import LinearHead


@dataclass(frozen=True)
class BackboneInfo:
    """What serving needs to rebuild one member backbone.

    Attributes:
        name: Unique name in the ensemble (the spec, or ``spec@size`` to tell sizes apart).
        spec: ``create_backbone`` spec.
        num_features: Feature dimension ``D``.
        image_size: Input side ``create_backbone(spec, image_size=...)`` must use; ``None``
            when unknown (features came from elsewhere).
        preprocessing: ``image_size``, ``mean``, ``std``, ``in_chans`` as plain values, or
            ``None`` when unknown.
    """

    name: str
    spec: str
    num_features: int
    image_size: int | None = None
    preprocessing: dict[str, object] | None = field(default=None, compare=False)

    @classmethod
    def from_backbone(cls, backbone: Backbone, name: str | None = None) -> BackboneInfo:
        """Describe a built backbone."""
        prep = backbone.preprocessing
        return cls(name=name or backbone.spec, spec=backbone.spec, num_features=backbone.num_features,
                   image_size=prep.image_size, preprocessing=preprocessing_dict(prep))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BackboneInfo:
        image_size = data.get("image_size")
        prep = data.get("preprocessing")
        return cls(name=str(data["name"]), spec=str(data["spec"]),
                   num_features=int(data["num_features"]),  # type: ignore[call-overload]
                   image_size=None if image_size is None else int(image_size),  # type: ignore[call-overload]
                   preprocessing=dict(prep) if isinstance(prep, dict) else None)


def preprocessing_dict(prep: Preprocessing) -> dict[str, object]:
    """A :class:`Preprocessing` as JSON-friendly values."""
    return {"image_size": prep.image_size, "mean": list(prep.mean), "std": list(prep.std),
            "in_chans": prep.in_chans}


class Ensemble(nn.Module):
    """Adaptive multi-backbone ensemble over precomputed features.

    Args:
        backbones: Member backbones in cost order (cheapest first).
        class_names: ``C`` class names.
        heads: One :class:`LinearHead` per backbone.
        combiners: One :class:`TemperatureCombiner` per prefix: ``combiners[k - 1]`` reads
            the first ``k`` backbones. At least the full one must be given as the last
            entry; a list of length 1 with ``n > 1`` backbones means no cascade.
        metadata: Protocol, training options and anything else to record in the artifact.

    Example:
        >>> logits, weights = ensemble([f_lite0, f_lite1, f_lite2])  # doctest: +SKIP
        >>> logits, weights = ensemble([f_lite0])  # cascade: cheapest backbone only  # doctest: +SKIP
    """

    def __init__(self, backbones: Sequence[BackboneInfo], class_names: Sequence[str], heads: Sequence[LinearHead],
                 combiners: Sequence[TemperatureCombiner], metadata: dict[str, object] | None = None) -> None:
        super().__init__()
        n = len(backbones)
        if n == 0 or len(heads) != n:
            raise ValueError(f"need one head per backbone: {n} backbones, {len(heads)} heads")
        names = [b.name for b in backbones]
        if len(set(names)) != n:
            raise ValueError(f"backbone names must be unique, got {names}")
        for info, head in zip(backbones, heads):
            if head.num_classes != len(class_names) or head.num_features != info.num_features:
                raise ValueError(f"head of {info.name!r} is {head.num_classes}x{head.num_features}, expected "
                                 f"{len(class_names)}x{info.num_features}")
        if not combiners or combiners[-1].num_backbones != n:
            raise ValueError(f"the last combiner must read all {n} backbones")
        for combiner in combiners:
            k = combiner.num_backbones
            if combiner.feature_dims != [b.num_features for b in backbones[:k]]:
                raise ValueError(f"combiner over {k} backbones has feature dims {combiner.feature_dims}")
        self.backbones = list(backbones)
        self.class_names = list(class_names)
        self.heads = nn.ModuleList(heads)
        self.combiners = nn.ModuleList(combiners)
        self.metadata = dict(metadata or {})
        self.eval()

    @property
    def backbone_specs(self) -> list[str]:
        """``create_backbone`` specs, in cost order."""
        return [b.spec for b in self.backbones]

    @property
    def backbone_names(self) -> list[str]:
        return [b.name for b in self.backbones]

    @property
    def num_backbones(self) -> int:
        return len(self.backbones)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def head_list(self) -> list[LinearHead]:
        """The heads, in cost order (typed view of ``self.heads``)."""
        return [cast(LinearHead, h) for h in self.heads]

    @property
    def combiner_list(self) -> list[TemperatureCombiner]:
        """The prefix combiners, by increasing prefix (typed view of ``self.combiners``)."""
        return [cast(TemperatureCombiner, c) for c in self.combiners]

    @property
    def cascade_prefixes(self) -> list[int]:
        """Numbers of leading backbones ``forward`` accepts."""
        return [c.num_backbones for c in self.combiner_list]

    def _combiner(self, k: int) -> TemperatureCombiner:
        for combiner in self.combiner_list:
            if combiner.num_backbones == k:
                return combiner
        raise ValueError(f"got features of {k} backbones; this ensemble accepts the first "
                         f"{self.cascade_prefixes} of {self.backbone_names}")

    def head_logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each backbone's head logits ``(B, C)`` for the features given (a prefix)."""
        return [head(x) for head, x in zip(self.heads, features)]

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble logits and per-image backbone weights.

        Args:
            features: Raw features of the first ``k`` backbones in cost order, each
                ``(B, D_b)``; ``k = n`` for the full ensemble, smaller ``k`` for a cascade step.

        Returns:
            ``(logits (B, C), weights (B, n))``. ``weights[:, b]`` is the share of backbone
            ``b`` in the combination, ``(1 / t_b) / sum_k (1 / t_k)`` (see
            :class:`TemperatureCombiner`); rows sum to 1 and unseen backbones get 0. It is
            the multiplier on each backbone's logits, not the share of the final score, since
            heads' logit scales differ.
        """
        features = [torch.as_tensor(f) for f in features]
        k = len(features)
        combiner = self._combiner(k)
        logits, weights = combiner(features, self.head_logits(features))
        if k < self.num_backbones:
            weights = torch.cat([weights, weights.new_zeros(weights.shape[0], self.num_backbones - k)], dim=1)
        return logits, weights

    @torch.no_grad()
    def predict(self, features: Sequence[np.ndarray | torch.Tensor],
                batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """``forward`` in batches on numpy arrays: ``(logits (N, C), weights (N, n))``."""
        tensors = [torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in features]
        if tensors[0].shape[0] == 0:
            return np.zeros((0, self.num_classes), np.float32), np.zeros((0, self.num_backbones), np.float32)
        outs = [self(tuple(t[i:i + batch_size] for t in tensors)) for i in range(0, tensors[0].shape[0], batch_size)]
        return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


def confident(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """The cascade's stopping rule: max softmax probability ``>= threshold``, per image ``(B,)``."""
    return torch.softmax(logits.float(), dim=1).amax(dim=1) >= threshold
