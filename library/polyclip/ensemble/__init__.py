"""Adaptive multi-backbone ensemble (Rodriguez-Opazo et al. 2024) on precomputed features.

Pure torch/numpy, no Ray: per-backbone heads (:mod:`heads`), the temperature combiner
(:mod:`combiner`), label protocols (:mod:`protocol`), the served :class:`Ensemble`
(:mod:`model`), baselines (:mod:`evaluate`), the cost cascade (:mod:`cascade`), the artifact
(:mod:`artifact`) and the one-call :func:`fit_ensemble` (:mod:`fit`).
"""

from polyclip.ensemble.artifact import EnsembleArtifactError, load_ensemble, save_ensemble
from polyclip.ensemble.cascade import CascadePoint, cascade_curve, choose_threshold, prefix_predictions
from polyclip.ensemble.combiner import TemperatureCombiner, train_combiner
from polyclip.ensemble.evaluate import evaluate_ensemble, single_key, write_ensemble_report
from polyclip.ensemble.fit import DEFAULT_THRESHOLDS, CascadeOptions, ProtocolOptions, fit_ensemble
from polyclip.ensemble.heads import LinearHead, fit_linear_probe, zero_shot_head
from polyclip.ensemble.model import BackboneInfo, Ensemble, confident, preprocessing_dict
from polyclip.ensemble.protocol import LabelProtocol, resolve_protocol

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BackboneInfo",
    "CascadeOptions",
    "CascadePoint",
    "Ensemble",
    "EnsembleArtifactError",
    "LabelProtocol",
    "LinearHead",
    "ProtocolOptions",
    "TemperatureCombiner",
    "cascade_curve",
    "choose_threshold",
    "confident",
    "evaluate_ensemble",
    "fit_ensemble",
    "fit_linear_probe",
    "load_ensemble",
    "prefix_predictions",
    "preprocessing_dict",
    "resolve_protocol",
    "save_ensemble",
    "single_key",
    "train_combiner",
    "write_ensemble_report",
    "zero_shot_head",
]
