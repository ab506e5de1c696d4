"""Serve throughput and p50/p99 latency of the ensemble vs the same work in-process.

Serves an ensemble artifact of the three EfficientNet-Lite backbones (one encoder
deployment each, ``@serve.batch``) on a local Ray instance and sends Fashion-MNIST test
images as PNG over loopback HTTP from 1, 8 and 32 concurrent clients; every level is
bounded by a request count and a time limit. The reference is the in-process pipeline on
the same images: decode (``decode_image``), the three encoders and the combiner, run in
batches as large as the client count. Ratio = Serve throughput / in-process throughput,
measured back to back.

Usage::

    python -m jobs.benchmarks.serve_latency [--artifact runs/<name>/ensemble] [--clients 1 8 32]
        [--requests 192] [--seconds 40]

Without ``--artifact``, fits a small one first (10 labels per class, 112 px, probes +
combiner on features encoded in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from jobs.benchmarks.common import command_line, out_dir
from polyclip.backbones import create_backbone
from polyclip.data.datasets import load_dataset
from polyclip.data.images import decode_image
from polyclip.data.splits import make_split
from polyclip.ensemble import BackboneInfo, Ensemble, fit_ensemble, load_ensemble, save_ensemble
from polyclip.features.cache import encode_images
from polyclip.reports.plots import line_plot
from polyclip.reports.tables import markdown_table

BACKBONES = ["efficientnet_lite:0", "efficientnet_lite:1", "efficientnet_lite:2"]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fit_small_artifact(path: Path, image_size: int) -> Path:
    """10 labels per class of Fashion-MNIST, the three lite backbones, default options."""
    dataset = load_dataset("fashion_mnist")
    split = make_split(dataset.train.labels, dataset.class_names, labels_per_class=10, seed=0, val_per_class=0,
                       test_labels=dataset.test.labels if dataset.test is not None else None, test_limit=10)
    train, infos = {}, {}
    for spec in BACKBONES:
        backbone = create_backbone(spec, image_size=image_size)
        train[spec] = encode_images(backbone, dataset.train.images[split.labeled])
        infos[spec] = BackboneInfo.from_backbone(backbone)
    ensemble, _ = fit_ensemble(train, dataset.train.labels[split.labeled], class_names=dataset.class_names,
                               backbones=infos, seed=0)
    return save_ensemble(path, ensemble)


class InProcess:
    """The served pipeline without Serve: decode, encoders, combiner, in one process."""

    def __init__(self, ensemble: Ensemble) -> None:
        self.ensemble = ensemble
        self.backbones = [create_backbone(b.spec, image_size=b.image_size) for b in ensemble.backbones]
        self.sizes = [(int(bb.preprocessing.image_size), 1 if bb.preprocessing.in_chans == 1 else 3)
                      for bb in self.backbones]

    @torch.inference_mode()
    def __call__(self, pngs: list[bytes]) -> np.ndarray:
        decoded = {key: np.stack([decode_image(p, key[0], channels=key[1]) for p in pngs])
                   for key in dict.fromkeys(self.sizes)}
        features = [bb.encode(torch.from_numpy(decoded[key])) for bb, key in zip(self.backbones, self.sizes)]
        logits, _ = self.ensemble(features)
        return logits.argmax(1).numpy()


def time_in_process(pipeline: InProcess, pngs: list[bytes], batch: int, max_seconds: float) -> dict[str, float]:
    pipeline(pngs[:batch])  # warm-up
    done, start = 0, time.perf_counter()
    while done < len(pngs) and time.perf_counter() - start < max_seconds:
        chunk = pngs[done:done + batch]
        pipeline(chunk)
        done += len(chunk)
    elapsed = time.perf_counter() - start
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


async def load_test(url: str, pngs: list[bytes], clients: int, max_requests: int,
                    max_seconds: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = 0
    deadline = time.perf_counter() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < max_requests and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            response = await client.post("/v1/classify", files={"file": ("x.png", pngs[i % len(pngs)], "image/png")})
            latencies.append(time.perf_counter() - t0)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        await client.post("/v1/classify", files={"file": ("x.png", pngs[0], "image/png")})  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    return {"clients": clients, "requests": len(latencies), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "statuses": statuses}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=192, help="max requests per client level")
    parser.add_argument("--seconds", type=float, default=40.0, help="max seconds per level (each side)")
    parser.add_argument("--batch-max-size", type=int, default=16)
    parser.add_argument("--in-process-threads", type=int, default=1,
                        help="torch threads of the in-process reference (each encoder replica uses 1); on a "
                             "contended machine 2 OpenMP threads stall each other")
    args = parser.parse_args(argv)
    print(f"command: {command_line()}", flush=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.in_process_threads)
    out = out_dir("serve_latency")
    artifact = Path(args.artifact) if args.artifact else fit_small_artifact(out / "artifact", args.image_size)
    ensemble = load_ensemble(artifact)
    dataset = load_dataset("fashion_mnist")
    assert dataset.test is not None
    pngs = [_png(img[0]) for img in dataset.test.images[:max(args.requests, 64)]]
    pipeline = InProcess(ensemble)

    import ray
    from ray import serve

    from jobs.runtime import project_runtime_env
    from serve.app import AppArgs, build_app

    ray.init(num_cpus=2, runtime_env=project_runtime_env(), logging_level=logging.WARNING, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # One replica per encoder, one intra-op thread each: three encoders share the 2 cores.
    serve.run(build_app(AppArgs.model_validate({
        "artifact": str(artifact), "num_cpus": 0, "ingress_num_cpus": 0, "torch_threads": 1,
        "batch_max_size": args.batch_max_size})), name="bench", route_prefix="/")
    rows = []
    try:
        for clients in args.clients:
            load_before = os.getloadavg()
            served = asyncio.run(load_test(f"http://127.0.0.1:{port}", pngs, clients, args.requests, args.seconds))
            local = time_in_process(pipeline, pngs[:args.requests], clients, args.seconds)
            rows.append({"clients": clients, "serve_req_per_s": round(served["requests_per_s"], 2),
                         "p50_ms": round(served["p50_ms"], 1), "p99_ms": round(served["p99_ms"], 1),
                         "requests": served["requests"], "statuses": served["statuses"],
                         "in_process_img_per_s (batch = clients)": round(local["images_per_s"], 2),
                         "ratio serve / in-process": round(served["requests_per_s"] / local["images_per_s"], 3),
                         "loadavg_1m_before": round(load_before[0], 1)})
            print(rows[-1], flush=True)
    finally:
        serve.delete("bench")
        serve.shutdown()
        ray.shutdown()
    report = {"command": command_line(), "artifact": str(artifact), "backbones": ensemble.backbone_names,
              "image_size": args.image_size, "rows": rows, "loadavg_end": os.getloadavg()}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    md = "\n".join([
        "# Ensemble on Ray Serve: loopback HTTP vs in-process\n", f"Command: `{report['command']}`\n",
        f"Backbones {ensemble.backbone_names} at {args.image_size} px; one replica per encoder (1 thread), "
        f"@serve.batch max {args.batch_max_size}; Fashion-MNIST test PNGs; each level at most {args.requests} "
        f"requests and {args.seconds} s per side. In-process: decode + 3 encoders + combiner, "
        f"{args.in_process_threads} torch thread(s), batch = client count. "
        "2 CPU cores shared with other agents: load average per row.\n",
        markdown_table(rows)])
    (out / "results.md").write_text(md + "\n")
    line_plot({"serve p50 (ms)": (args.clients, [r["p50_ms"] for r in rows]),
               "serve p99 (ms)": (args.clients, [r["p99_ms"] for r in rows])},
              out / "serve_latency.png", "Serve latency vs concurrent clients", "clients", "ms")
    print(md)
    return report


if __name__ == "__main__":
    main()
