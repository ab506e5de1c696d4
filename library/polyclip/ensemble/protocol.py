"""Which labeled images fit the heads and which fit the combiner.

When the heads are linear probes fitted on the same few labels as the combiner, a probe
is (nearly) perfect on its own training images, so a combiner trained on those images
only learns to sharpen. Protocols:

``"split"``
    Per class, ``combiner_fraction`` (10%, as in the paper) of the labeled images, at
    least one, fit the combiner; the rest (at least one) fit the probes. Needs two or more
    labels in every class.
``"shared"``
    Probes and combiner both use every labeled image. The only choice with one label per
    class; the combiner then mostly learns per-image confidence, so expect it to gain
    less over logit averaging.
``"auto"`` (the default request)
    ``"split"`` when every class has at least two labels, else ``"shared"``.
``"given_heads"``
    Resolved automatically when no head is fitted (all zero-shot): the combiner uses
    every labeled image and nothing leaks. This is the paper's own zero-shot setting.

Every result records the resolved protocol and the request it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROTOCOLS = ("auto", "split", "shared")


@dataclass(frozen=True)
class LabelProtocol:
    """A resolved protocol with the indices (into the labeled set) each part uses.

    Attributes:
        name: ``"split"``, ``"shared"`` or ``"given_heads"``.
        requested: What the caller asked for.
        head_indices: Images the probes are fitted on.
        combiner_indices: Images the combiner is trained on.
        reason: Why ``name`` differs from ``requested``, else empty.
    """

    name: str
    requested: str
    head_indices: np.ndarray
    combiner_indices: np.ndarray
    reason: str = ""

    def describe(self) -> dict[str, object]:
        """JSON-serialisable summary for results and the artifact."""
        return {"protocol": self.name, "protocol_requested": self.requested, "protocol_reason": self.reason,
                "n_head_labels": len(self.head_indices),
                "n_combiner_labels": len(self.combiner_indices)}


def resolve_protocol(labels: np.ndarray, num_classes: int, *, protocol: str = "auto", fits_heads: bool = True,
                     combiner_fraction: float = 0.1, seed: int = 0) -> LabelProtocol:
    """Decide which labeled images fit the heads and which the combiner.

    Args:
        labels: ``(N,)`` labels of the labeled set.
        num_classes: ``C``.
        protocol: ``"auto"``, ``"split"`` or ``"shared"`` (see the module docstring).
        fits_heads: False when every head is given (zero-shot): resolves to ``"given_heads"``.
        combiner_fraction: Share of each class's labels for the combiner under ``"split"``.
        seed: Seeds which images of a class go to the combiner.

    Raises:
        ValueError: Unknown protocol, a class without labels, or ``"split"`` requested
            while some class has a single label.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if not 0.0 < combiner_fraction < 1.0:
        raise ValueError(f"combiner_fraction must lie in (0, 1), got {combiner_fraction}")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    everything = np.arange(len(labels))
    if not fits_heads:
        return LabelProtocol("given_heads", protocol, np.empty(0, dtype=np.int64), everything,
                             "no head is fitted on labels")
    if (counts == 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no labeled image")
    too_few = np.flatnonzero(counts < 2).tolist()
    if protocol == "shared" or (protocol == "auto" and too_few):
        reason = f"classes {too_few} have a single label" if protocol == "auto" else ""
        return LabelProtocol("shared", protocol, everything, everything, reason)
    if too_few:
        raise ValueError(f"protocol 'split' needs two labels per class; classes {too_few} have one "
                         "(use 'shared' or 'auto')")
    rng = np.random.default_rng(seed)
    head, combiner = [], []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(members) - 1, max(1, round(combiner_fraction * len(members))))
        combiner.append(members[:k])
        head.append(members[k:])
    return LabelProtocol("split", protocol, np.sort(np.concatenate(head)), np.sort(np.concatenate(combiner)))
