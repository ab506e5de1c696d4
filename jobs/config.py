"""Typed job configs: YAML plus dotted ``key=value`` overrides, validated before Ray starts.

Configs are parsed here, at the job boundary, and only plain values go on into the
library. An unknown or mistyped key fails with its dotted name and the valid keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from jobs.config_base import (
    ConfigError as ConfigError,  # jobs and tests import it from here
)
from jobs.config_base import (
    SafeName,
    StrictModel,
    apply_overrides,
    read_yaml_mapping,
    validate,
)


class DataConfig(StrictModel):
    """Which images, and how they are split."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    image_size: int | None = Field(None, gt=0, description="decode size for imagefolder data")
    labels_per_class: int = Field(10, description="k labeled images per class; -1 for all")
    val_per_class: int = Field(50, ge=0)
    unlabeled: int | None = Field(None, ge=0, description="cap on the unlabeled pool; null for all")
    test_limit: int | None = Field(None, gt=0, description="cap on test images; null for the full test set")
    strict: bool = False
    synthetic_size: int = Field(2000, gt=0)
    unlabeled_source: str | None = Field(
        None, description="unlabeled pool: a flat folder/prefix of images (local, NFS, s3://...) or a CSV/Parquet "
        "manifest with a 'path' column; null: carve the pool out of the labeled dataset")
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer of streamed data "
                                "(on top of a seeded permutation of the pool and a new block order every pass)")
    prefetch_batches: int = Field(2, ge=0, description="batches prefetched per streamed dataset")
    stream_pool: bool = Field(True, description="false: an in-memory pool travels in the object-store payload "
                              "instead of a Ray Dataset (comparisons; a pool from a source always streams)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value.partition(":")[0] not in {"fashion_mnist", "imagefolder", "manifest", "synthetic"}:
            raise ValueError(f"unknown dataset {value!r}; valid: fashion_mnist, imagefolder:<path or URI>, "
                             "manifest:<CSV or Parquet with path,label>, synthetic")
        return value

    @field_validator("labels_per_class")
    @classmethod
    def _positive_k(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("labels_per_class must be >= 1, or -1 for every label")
        return value


class BackboneConfig(StrictModel):
    """The image encoder (see ``polyclip.backbones.factory``)."""

    spec: str = "efficientnet_lite:0"
    image_size: int | None = Field(None, gt=0)

    @field_validator("spec")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        kinds = {"efficientnet_lite", "timm", "open_clip", "random", "checkpoint", "pixels"}
        if value.partition(":")[0] not in kinds:
            raise ValueError(f"unknown backbone spec {value!r}; kinds: {', '.join(sorted(kinds))}")
        return value


class TrainConfig(StrictModel):
    """Optimisation, shared by every method."""

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0, description="per worker")
    steps_per_epoch: int | None = Field(None, gt=0, description="default: one pass over the largest stream")
    optimizer: Literal["sgd", "adam", "adamw", "lars"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    scheduler: Literal["cosine", "fixmatch_cosine", "constant", "plateau"] = Field(
        "cosine", description="cosine: half cosine to 0 after warm-up; fixmatch_cosine: cos(7 pi k / 16 K) (FixMatch)")
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    eval_every: int = Field(1, gt=0, description="validate every N epochs")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="autocast dtype; auto: bf16 on GPUs that support it, else fp16 with a GradScaler on "
        "GPUs, fp32 on CPU")
    channels_last: bool = Field(False, description="channels_last memory format for conv backbones on GPUs")
    log_every_steps: int = Field(50, gt=0, description="read the loss back from the device every N steps")


class ScalingSection(StrictModel):
    """How many Ray Train workers, and on what."""

    num_workers: int = Field(1, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    gpu_wait_s: float = Field(600.0, ge=0, description="use_gpu=true: how long to wait for GPUs before failing")
    sync_batchnorm: bool | None = Field(
        None, description="convert BatchNorm to SyncBatchNorm across GPU workers; null: on for SimCLR (its batch "
        "statistics should see the global batch), off otherwise")


class RunSection(StrictModel):
    """Where results go and how failures are handled."""

    output_dir: str = "runs"
    storage_path: str | None = Field(
        None, description="Ray storage (local dir, NFS or s3://...); default <output_dir>/<name>/ray")
    feature_store: str | None = Field(
        None, description="feature store root (local dir, NFS or s3://...); default <storage_path>/features")
    max_failures: int = Field(2, ge=-1)
    num_checkpoints: int = Field(2, gt=0)
    encode_workers: int = Field(2, gt=0, description="parallel Ray tasks for feature caching")
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers for every training run")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cache_dir" in data:
            raise ValueError(f"run.cache_dir is now run.feature_store (the same folder of feature shards); "
                             f"set run.feature_store: {data['cache_dir']!r}")
        return data


class WordVectorsSection(StrictModel):
    """Word vectors for label semantics (CES, DeViSE, semantic error metrics)."""

    source: str = "glove-6b-50d"
    head_word: bool = Field(True, description="keep the last word of each label alternative, as the CES paper "
                            "does ('brain coral' -> 'coral'); false: average the vectors of every word")
    overrides: dict[str, str] = Field(default_factory=dict)


class JobConfig(StrictModel):
    """A whole training job."""

    name: SafeName
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    method: Any = Field(..., description="method.name picks the method; its other keys are the method's")
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    word_vectors: WordVectorsSection | None = None

    @classmethod
    def field_annotation(cls, name: str, value: Any) -> Any:
        """``method``: the parameters model of the method ``value`` names (``Any`` for an unknown one)."""
        if name != "method":
            return super().field_annotation(name, value)
        from jobs.recipes import RECIPES

        method = value.get("name") if isinstance(value, dict) else None
        return RECIPES[method].params if method in RECIPES else Any

    @field_validator("method", mode="before")
    @classmethod
    def _method_params(cls, value: Any) -> BaseModel:
        from jobs.recipes import RECIPES

        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError(f"method needs a 'name'; valid: {', '.join(sorted(RECIPES))}")
        name = value["name"]
        if name not in RECIPES:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(RECIPES))}")
        return RECIPES[name].params.model_validate(value)

    @model_validator(mode="after")
    def _method_checks(self) -> JobConfig:
        from jobs.recipes import RECIPES

        check = RECIPES[self.method.name].check
        if check is not None:
            check(self, self.method)
        return self

    @model_validator(mode="after")
    def _storage_default(self) -> JobConfig:
        output = Path(self.run.output_dir)
        if not output.is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            # Under `ray job submit` the working dir is a temporary copy that Ray deletes:
            # relative outputs go to ~/polyclip instead, so runs outlive the job.
            object.__setattr__(self.run, "output_dir", str(Path.home() / "polyclip" / output))
        if self.run.storage_path is None:
            # Inside the run folder, so deleting a run also deletes its resumable state.
            object.__setattr__(self.run, "storage_path", str(Path(self.run.output_dir, self.name, "ray").resolve()))
        if self.run.feature_store is None:
            object.__setattr__(self.run, "feature_store", self.run.storage_path.rstrip("/") + "/features")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.name


def parse_config(data: dict[str, Any]) -> JobConfig:
    """Validate a config dict.

    Raises:
        ConfigError: Naming every bad key.
    """
    return validate(JobConfig, data)


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML config, apply dotted overrides, validate.

    Raises:
        ConfigError: Missing file, bad YAML, or invalid keys/values.
    """
    return parse_config(apply_overrides(read_yaml_mapping(path), overrides or []))
