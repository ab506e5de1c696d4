"""Fit the adaptive multi-backbone ensemble and write its run directory and artifact.

Usage::

    python -m jobs.ensemble --config jobs/configs/ensemble/demo.yaml [dotted.key=value ...] [--address ADDR]

The config is validated before Ray starts. The job loads the dataset and draws the
seeded split (the same code as ``jobs.train``), encodes the labeled, validation and test
images with every backbone through the Ray-parallel feature cache, fits one head per
backbone (a CLIP zero-shot head for an ``open_clip:`` backbone with weights, otherwise a
linear probe on the labeled images) and the adaptive temperature combiner of
Rodriguez-Opazo et al. 2024 (one per cascade prefix), evaluates it against every single
backbone, logit and probability averaging and the per-image oracle, and writes
``runs/<name>/``:

* ``config.yaml``, ``split.json``
* ``metrics.json``: resolved label protocol, options, test and validation evaluation,
  cascade curves and the threshold chosen on the validation split (``cascade.chosen``;
  ``cascade.chosen_test`` is its test point, reported only), feature-cache statistics,
  timings
* ``ensemble.md`` (tables), ``ensemble_accuracy.png``, ``cascade.png``
* ``ensemble/``: the artifact ``serve.app:build_app`` loads (see ``serve/README.md``)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from jobs.cli import job_parser, start_job
from jobs.config import BackboneConfig, DataConfig
from jobs.config_base import ConfigError, SafeName, StrictModel, apply_overrides, read_yaml_mapping, validate
from jobs.data import load_split_data
from jobs.features import cached_features
from jobs.runtime import init_ray
from polyclip.backbones import create_backbone, has_trained_text_encoder
from polyclip.data.datasets import Dataset
from polyclip.data.splits import Split
from polyclip.ensemble import (
    DEFAULT_THRESHOLDS,
    BackboneInfo,
    CascadeOptions,
    LinearHead,
    ProtocolOptions,
    fit_ensemble,
    save_ensemble,
    write_ensemble_report,
    zero_shot_head,
)
from polyclip.features.cache import FeatureCache
from polyclip.io import atomic_write_json, atomic_write_text
from polyclip.reports.tables import markdown_table

logger = logging.getLogger("polyclip")

ARTIFACT_DIR = "ensemble"


class MemberConfig(BackboneConfig):
    """One member backbone; members are listed cheapest first (the cascade's order)."""

    name: str | None = Field(None, description="unique name in the ensemble; default: the spec")
    head: Literal["auto", "probe", "zero_shot"] = Field(
        "auto", description="auto: CLIP zero-shot head for open_clip:<weights> backbones, else a linear probe")

    @property
    def member_name(self) -> str:
        return self.name or self.spec


class CombinerConfig(StrictModel):
    """The adaptive combiner (see ``polyclip.ensemble.combiner``) and the probes."""

    hidden: int = Field(128, gt=0, description="hidden width of the MLP (128 in the paper)")
    combine: Literal["divide", "multiply"] = Field("divide", description="z / t (paper) or z * w")
    positivity: Literal["softplus", "exp"] = "softplus"
    feature_norm: Literal["l2", "none"] = Field("l2", description="per-backbone feature normalisation")
    eps: float = Field(1e-3, gt=0)
    steps: int = Field(500, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int | None = Field(None, gt=0, description="null: full batch")
    probe_l2: float = Field(1e-3, gt=0, description="ridge penalty of the linear probes")


class ProtocolConfig(StrictModel):
    """Which labeled images fit the probes and which the combiner."""

    name: Literal["auto", "split", "shared"] = Field(
        "auto", description="split: heads on (1 - fraction), combiner on fraction; auto: split when possible")
    combiner_fraction: float = Field(0.1, gt=0, lt=1)


class CascadeConfig(StrictModel):
    """The cost cascade evaluated by the job (serving picks its own threshold)."""

    enabled: bool = True
    thresholds: list[float] = Field(default_factory=lambda: list(DEFAULT_THRESHOLDS), min_length=1)
    max_accuracy_drop: float = Field(0.005, ge=0, description="accuracy budget for the chosen threshold")


class EnsembleRunConfig(StrictModel):
    """Where results and the feature cache go."""

    output_dir: str = "runs"
    feature_store: str = Field(".cache/features", description="feature store root (local dir, NFS or s3://...)")
    encode_workers: int = Field(2, gt=0, description="parallel Ray actors for feature caching")


class EnsembleJobConfig(StrictModel):
    """A whole ensemble-fitting job."""

    name: SafeName
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    backbones: list[MemberConfig] = Field(..., min_length=1)
    combiner: CombinerConfig = Field(default_factory=CombinerConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    run: EnsembleRunConfig = Field(default_factory=EnsembleRunConfig)

    @model_validator(mode="after")
    def _unique_members(self) -> EnsembleJobConfig:
        names = [m.member_name for m in self.backbones]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"backbone names {duplicated} appear twice; give each a distinct 'name'")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.name


def parse_ensemble_config(data: dict[str, Any]) -> EnsembleJobConfig:
    """Validate an ensemble config dict.

    Raises:
        ConfigError: Naming every bad key and value.
    """
    return validate(EnsembleJobConfig, data)


def load_ensemble_config(path: str | Path, overrides: list[str] | None = None) -> EnsembleJobConfig:
    """Read a YAML ensemble config, apply dotted overrides, validate.

    Raises:
        ConfigError: Missing file, bad YAML, or invalid keys/values.
    """
    return parse_ensemble_config(apply_overrides(read_yaml_mapping(path), overrides or []))


def _features(cfg: EnsembleJobConfig, cache: FeatureCache, dataset: Dataset, split: Split, member: MemberConfig,
              subset: str, stats: dict[str, Any]) -> np.ndarray:
    pool = "test" if subset == "test" and split.test_from == "test" else "train"
    indices = getattr(split, subset)
    images = (dataset.test if pool == "test" else dataset.train).images[indices]  # type: ignore[union-attr]
    return cached_features(cache, member.spec, member.image_size, dataset.fingerprint, dataset.spec, pool, indices,
                           images, num_workers=cfg.run.encode_workers, stats=stats)


def _head_kind(member: MemberConfig) -> str:
    if member.head != "auto":
        return member.head
    # Only a CLIP with real weights has a meaningful text tower; random:open_clip does not.
    return "zero_shot" if has_trained_text_encoder(member.spec) else "probe"


def _zero_shot_head(member: MemberConfig, class_names: list[str]) -> LinearHead:
    from polyclip.text.clip_zeroshot import zero_shot_classifier

    backbone = create_backbone(member.spec, image_size=member.image_size)
    if not backbone.has_text:
        raise ConfigError(f"backbone {member.spec!r} has no text encoder; set head: probe")
    weights = zero_shot_classifier(backbone, None, class_names)  # (D, C)
    return zero_shot_head(weights.T, logit_scale=float(backbone.logit_scale or 100.0))


def run_ensemble(cfg: EnsembleJobConfig) -> dict[str, Any]:
    """Fit and evaluate the ensemble of a validated config on the connected Ray cluster.

    Returns:
        The metrics written to ``metrics.json``.
    """
    t0 = time.perf_counter()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # load_data reads only `data` and `seed`: the same dataset and split as a train job.
    dataset, split = load_split_data(cfg.data, cfg.seed)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.dump(), sort_keys=False))
    split.save(run_dir / "split.json")
    logger.info("%s: %d classes, %d labeled, %d val, %d test images; %d backbones", dataset.spec,
                dataset.num_classes, len(split.labeled), len(split.val), len(split.test), len(cfg.backbones))
    cache = FeatureCache(cfg.run.feature_store)
    stats: dict[str, Any] = {}
    feats: dict[str, dict[str, np.ndarray]] = {"labeled": {}, "val": {}, "test": {}}
    infos: dict[str, BackboneInfo] = {}
    given: dict[str, LinearHead] = {}
    for member in cfg.backbones:
        name = member.member_name
        for subset in feats:
            if subset == "val" and len(split.val) == 0:
                continue
            feats[subset][name] = _features(cfg, cache, dataset, split, member, subset, stats)
        backbone = create_backbone(member.spec, image_size=member.image_size)
        infos[name] = BackboneInfo.from_backbone(backbone, name=name)
        if _head_kind(member) == "zero_shot":
            given[name] = _zero_shot_head(member, dataset.class_names)
        del backbone
    t_features = time.perf_counter()

    y_labeled = dataset.train.labels[split.labeled]
    test_pool = dataset.test if split.test_from == "test" else dataset.train
    y_test = test_pool.labels[split.test]  # type: ignore[union-attr]
    comb, proto, casc = cfg.combiner, cfg.protocol, cfg.cascade
    has_val = bool(feats["val"])
    ensemble, results = fit_ensemble(
        feats["labeled"], y_labeled, feats["test"], y_test, class_names=dataset.class_names, backbones=infos,
        features_val=feats["val"] if has_val else None, y_val=dataset.train.labels[split.val] if has_val else None,
        zero_shot_heads=given, protocol=ProtocolOptions(**proto.model_dump()),
        probe_l2=comb.probe_l2, hidden=comb.hidden, combine=comb.combine, positivity=comb.positivity,
        feature_norm=comb.feature_norm, eps=comb.eps, steps=comb.steps, lr=comb.lr, weight_decay=comb.weight_decay,
        batch_size=comb.batch_size, seed=cfg.seed,
        # One backbone has no cheaper prefix: no cascade to fit.
        cascade=CascadeOptions(**{**casc.model_dump(), "enabled": casc.enabled and len(cfg.backbones) > 1}),
    )
    cascade = results.get("cascade")
    if isinstance(cascade, dict) and cascade.get("chosen"):
        # Serving reads this as the suggested cascade threshold (serve/README.md); it is
        # chosen on the validation split, never on the test set.
        ensemble.metadata["cascade_chosen"] = {**cascade["chosen"], "selected_on": "validation"}
    elif isinstance(cascade, dict):
        logger.warning("no validation images (data.val_per_class=0): no cascade threshold is chosen")
    ensemble.metadata.update({"dataset": dataset.spec, "labels_per_class": cfg.data.labels_per_class,
                              "job": cfg.name, "head_kinds": {n: h.kind for n, h in
                                                              zip(ensemble.backbone_names, ensemble.head_list)}})
    artifact = save_ensemble(run_dir / ARTIFACT_DIR, ensemble)
    paths = write_ensemble_report(results, run_dir, title=f"{cfg.name}: adaptive ensemble vs baselines")
    evaluation: dict[str, Any] = results["evaluation"]  # type: ignore[assignment]
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "dataset": dataset.spec,
        "labels_per_class": cfg.data.labels_per_class,
        "backbones": ensemble.backbone_names,
        "head_kinds": ensemble.metadata["head_kinds"],
        "test": {"top1": evaluation["accuracy"]["adaptive"], "n": evaluation["n"]},
        **{k: v for k, v in results.items() if k not in ("evaluation", "val_evaluation")},
        "evaluation": evaluation,
        "val_evaluation": results.get("val_evaluation"),
        "feature_cache": stats,
        "seconds": {"features": round(t_features - t0, 2), "fit": round(time.perf_counter() - t_features, 2),
                    "total": round(time.perf_counter() - t0, 2)},
        "artifact": str(artifact.resolve()),
        "report": {k: str(v) for k, v in paths.items()},
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: test (and validation) accuracy."""
    val = (metrics.get("val_evaluation") or {}).get("accuracy", {})
    return [{"method": k, "test accuracy": v, "val accuracy": val.get(k)}
            for k, v in metrics["evaluation"]["accuracy"].items()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the run's metrics (callable from tests)."""
    parser = job_parser("python -m jobs.ensemble", __doc__, config_help="YAML ensemble config")
    _, cfg = start_job(parser, argv, lambda args: load_ensemble_config(args.config, args.overrides),
                       connect=init_ray)
    metrics = run_ensemble(cfg)
    print(markdown_table(summary_rows(metrics)))
    chosen = (metrics.get("cascade") or {}).get("chosen")
    on_test = (metrics.get("cascade") or {}).get("chosen_test")
    print(f"label protocol: {metrics['protocol']} ({metrics['n_head_labels']} head labels, "
          f"{metrics['n_combiner_labels']} combiner labels)")
    if chosen and on_test:
        print(f"cascade: threshold {chosen['threshold']} (chosen on validation) -> test: "
              f"{on_test['mean_calls']:.2f} backbone calls/image, accuracy {on_test['accuracy']:.4f}")
    print(f"run directory: {cfg.run_dir.resolve()}")
    print(f"artifact: {metrics['artifact']}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
