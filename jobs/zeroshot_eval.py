"""Evaluate a CLIP zero-shot prompt classifier on a dataset: no training, one command.

Usage (with real weights, on a machine that has them)::

    python -m jobs.zeroshot_eval --config jobs/configs/zeroshot/clip_eval.yaml \
        backbone.spec=open_clip:ViT-B-32/openai                       # hub tag (needs network once)
    python -m jobs.zeroshot_eval --config jobs/configs/zeroshot/clip_eval.yaml \
        backbone.spec=open_clip:ViT-B-32@/models/vit-b-32-openai.pt   # local checkpoint file

The config is a job config with ``method.name: clip_zeroshot``
(:mod:`jobs.recipes.clip_zeroshot`: templates, template ensembles, class prompts, and
an optional seen/unseen class split). The job loads the dataset and its seeded split,
encodes the test images through the feature cache (Ray-parallel on a miss), builds the
zero-shot head from the backbone's text tower (templates averaged in embedding space),
scores every test image with the model's logit scale, and writes the run directory:
``config.yaml``, ``split.json``, ``metrics.json`` (``test.top1`` ..., and under
``zero_shot`` the unseen-only / seen-only / generalised accuracy of the class split),
``report.md``, ``confusion.png``, ``predictions.npz`` and ``zero_shot_head.npz``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jobs.cli import job_parser, start_job
from jobs.config import ConfigError, JobConfig, load_config
from jobs.data import load_data, prepare_payload
from jobs.recipes.clip_zeroshot import build_head, zero_shot_scores
from jobs.runtime import init_ray
from polyclip.backbones import create_backbone
from polyclip.io import atomic_save_npz, atomic_write_text
from polyclip.metrics.zero_shot import choose_unseen, zero_shot_report
from polyclip.reports.run_report import summary_row, write_run_report
from polyclip.reports.tables import markdown_table

logger = logging.getLogger("polyclip")


def run_eval(cfg: JobConfig) -> dict[str, Any]:
    """Evaluate a validated ``clip_zeroshot`` config on the connected Ray cluster; return its metrics."""
    params = cfg.method
    t0 = time.perf_counter()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset, split = load_data(cfg)
    names = list(dataset.class_names)
    unseen = (choose_unseen(names, params.unseen_classes, params.num_unseen, cfg.seed)
              if params.unseen_classes or params.num_unseen else None)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.dump(), sort_keys=False))
    split.save(run_dir / "split.json")
    stats: dict[str, Any] = {}
    payload = prepare_payload(cfg, dataset, split, stats)
    t_encoded = time.perf_counter()
    backbone = create_backbone(cfg.backbone.spec, image_size=cfg.backbone.image_size)
    weights = build_head(backbone, names, params)
    logit_scale = float(backbone.logit_scale if backbone.logit_scale is not None else 100.0)
    test = payload.test
    logits = zero_shot_scores(test["x"], weights, logit_scale)
    atomic_save_npz(run_dir / "predictions.npz", test_logits=logits, test_labels=test["y"])
    atomic_save_npz(run_dir / "zero_shot_head.npz", weights=weights.numpy(),
                    logit_scale=np.asarray(logit_scale, dtype=np.float32), class_names=np.asarray(names))
    extra: dict[str, Any] = {
        "zero_shot_head": {"backbone": cfg.backbone.spec, "templates": params.all_templates(),
                           "num_templates": len(params.all_templates()), "logit_scale": logit_scale,
                           "embedding_dim": int(weights.shape[0])},
        "feature_cache": stats,
        "seconds": {"encode": round(t_encoded - t0, 2), "head_and_scoring": round(time.perf_counter() - t_encoded, 2)},
    }
    if unseen is not None:
        extra["zero_shot"] = zero_shot_report(logits, test["y"], names, unseen, seed=cfg.seed)
    return write_run_report(run_dir, name=cfg.name, class_names=names, test_logits=logits, test_labels=test["y"],
                            train_labels=np.zeros(0, dtype=np.int64), history=[], extra=extra)


def _load_clip_zeroshot(args: argparse.Namespace) -> JobConfig:
    """The config; any method other than clip_zeroshot is refused (it trains: jobs.train runs it)."""
    cfg = load_config(args.config, args.overrides)
    if cfg.method.name != "clip_zeroshot":
        raise ConfigError(f"jobs.zeroshot_eval runs method clip_zeroshot, the config has {cfg.method.name!r}; "
                          "train other methods with python -m jobs.train")
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the run's metrics (callable from tests)."""
    parser = job_parser("python -m jobs.zeroshot_eval", __doc__,
                        config_help="YAML job config with method.name: clip_zeroshot")
    _, cfg = start_job(parser, argv, _load_clip_zeroshot, connect=init_ray)
    metrics = run_eval(cfg)
    print(markdown_table([summary_row(metrics)]))
    if "zero_shot" in metrics:
        z = metrics["zero_shot"]
        print(markdown_table([{k: z[k] for k in ("unseen_top1", "seen_top1", "generalised_top1",
                                                  "generalised_harmonic")}]))
    print(f"run directory: {Path(cfg.run_dir).resolve()}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
