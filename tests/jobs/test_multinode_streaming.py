"""FixMatch and SimCLR jobs on a 2-node local cluster, streaming their pool from an image folder in a real
S3-compatible bucket (SeaweedFS on loopback), with Ray Train's storage_path in that bucket too: nothing relies on a
path that only the driver wrote."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import train
from tests.s3_fixtures import s3_server, upload_folder  # noqa: F401 - fixture

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
COLOURS = [(200, 40, 40), (40, 190, 60), (50, 60, 210)]


def _jpeg(colour, rng) -> bytes:
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, size=(30, 40, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):  # noqa: F811
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("photos")
    for c, colour in enumerate(COLOURS):
        (root / "labeled" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            (root / "labeled" / f"class{c}" / f"{i}.jpg").write_bytes(_jpeg(colour, rng))
    (root / "pool").mkdir()
    for i in range(48):
        (root / "pool" / f"{i:03d}.jpg").write_bytes(_jpeg(COLOURS[i % 3], rng))
    (root / "pool" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    upload_folder(s3_server, root, "photos")
    s3_server.filesystem().create_dir("runs")
    return s3_server


@pytest.fixture()
def s3_two_nodes(_ray_session, bucket, monkeypatch):
    """Two nodes (2 CPUs each) started with the bucket's credentials in their environment, as on a real cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from jobs.runtime import project_runtime_env

    for key, value in bucket.env().items():
        monkeypatch.setenv(key, value)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, runtime_env=project_runtime_env(), logging_level="WARNING")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


COMMON = ["data.dataset=imagefolder:s3://photos/labeled", "data.unlabeled_source=s3://photos/pool",
          "data.labels_per_class=2", "data.val_per_class=2", "data.test_limit=6", "data.image_size=16",
          "backbone.spec=random:small_cnn@8", "train.epochs=1", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
          "data.shuffle_buffer=8", "run.storage_path=s3://runs/polyclip"]


@pytest.mark.slow  # two jobs on a 2-node cluster: minutes on 2 cores (run with -m slow)
@pytest.mark.timeout(900)
def test_fixmatch_and_simclr_stream_an_s3_pool_on_two_nodes(s3_two_nodes, bucket, tmp_path):
    fixmatch = train.main(["--config", str(CONFIGS / "semi" / "fm40_fixmatch.yaml"), *COMMON,
                           "train.steps_per_epoch=4", "train.batch_size=2", "method.mu=4",
                           f"run.output_dir={tmp_path}", "--address", s3_two_nodes.address])
    assert fixmatch["epochs"] == 1 and "runs/polyclip" in fixmatch["ray_storage"]
    # 2 workers x 4 steps x 8 pool rows = 64 > 48 readable images: every pool image was decoded at least once.
    skipped = fixmatch["streamed_skipped_files"]["unlabeled"]
    assert any(p["path"].endswith("zz_broken.jpg") for p in skipped["paths"])
    assert json.loads((tmp_path / "fm40-fixmatch" / "metrics.json").read_text())["epochs"] == 1

    simclr = train.main(["--config", str(CONFIGS / "simclr" / "pretrain_fmnist.yaml"), *COMMON,
                         "train.steps_per_epoch=2", "train.batch_size=8", "method.augment=small",
                         f"run.output_dir={tmp_path}", "--address", s3_two_nodes.address])
    assert simclr["epochs"] == 1
    assert (tmp_path / "simclr-pretrain-fmnist" / "checkpoint" / "backbone").is_dir()
    # Ray Train kept its checkpoints in the bucket, not on a node's disk.
    from pyarrow import fs

    files = [info.path for info in bucket.filesystem().get_file_info(fs.FileSelector("runs/polyclip", recursive=True))]
    for run in ("fm40-fixmatch", "simclr-pretrain-fmnist"):
        assert any(f.startswith(f"runs/polyclip/{run}/") and f.endswith("/state.pt") for f in files), run
