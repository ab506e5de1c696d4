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
        [--requests 192] [--seconds 40] [--mode per_backbone single]

``--mode`` picks :class:`serve.app.AppArgs` ``deployment_mode`` (one encoder deployment per
backbone, or every encoder inside the ingress); several modes are measured one after the
other on the same images, each deployed with the app's default resources.

Without ``--artifact``, fits a small one first (10 labels per class, 112 px, probes +
combiner on features encoded in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from jobs.benchmarks.common import announce, free_port, out_dir, write_results
from polyclip.backbones import create_backbone
from polyclip.data.datasets import load_dataset
from polyclip.data.images import decode_image
from polyclip.data.splits import make_split
from polyclip.ensemble import BackboneInfo, Ensemble, fit_ensemble, load_ensemble, save_ensemble
from polyclip.features.cache import encode_images
from polyclip.reports.plots import line_plot

BACKBONES = ["efficientnet_lite:0", "efficientnet_lite:1", "efficientnet_lite:2"]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


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


async def _drive(url: str, clients: int, max_requests: int, max_seconds: float,
                 request: Callable[[int], dict[str, Any]], warmup: dict[str, Any] | None = None
                 ) -> tuple[np.ndarray, dict[int, int], float]:
    """``clients`` concurrent clients posting ``request(i)`` to ``/v1/classify`` until ``max_requests``
    requests or ``max_seconds``; the latencies (ms), the count of each status and the seconds taken."""
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
            response = await client.post("/v1/classify", **request(i))
            latencies.append(time.perf_counter() - t0)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        if warmup is not None:
            await client.post("/v1/classify", **warmup)
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return np.asarray(latencies) * 1e3, statuses, elapsed


def _image(png: bytes) -> dict[str, Any]:
    return {"files": {"file": ("x.png", png, "image/png")}}


async def load_test(url: str, pngs: list[bytes], clients: int, max_requests: int,
                    max_seconds: float) -> dict[str, Any]:
    """Requests/s and latency percentiles of ``clients`` concurrent clients sending good images."""
    lat, statuses, elapsed = await _drive(url, clients, max_requests, max_seconds,
                                          lambda i: _image(pngs[i % len(pngs)]), warmup=_image(pngs[0]))
    return {"clients": clients, "requests": len(lat), "seconds": elapsed,
            "requests_per_s": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "statuses": statuses}


def _bad_requests() -> list[dict[str, Any]]:
    """Requests that must get a 4xx: text, a bomb, a 5,000-digit top_k, broken JSON and multipart."""
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, format="PNG")
    return [
        {"files": {"file": ("x.png", b"not an image", "image/png")}},
        {"files": {"file": ("x.png", bomb.getvalue(), "image/png")}},
        {"content": b'{"image_base64": "aGVsbG8=", "top_k": ' + b"9" * 5000 + b"}",
         "headers": {"Content-Type": "application/json"}},
        {"content": b"[" * 50_000, "headers": {"Content-Type": "application/json"}},
        {"content": b"--x\r\ngarbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
    ]


def ingress_peak_rss_mb(app: str) -> float | None:
    """Peak resident memory (VmHWM) of the app's first ingress replica, on this machine."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#Ingress#")]
    if not names:
        return None
    pid = ray.get(ray.get_actor(names[0], namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


async def soak(url: str, pngs: list[bytes], clients: int, max_requests: int, max_seconds: float,
               bad_every: int = 4) -> dict[str, Any]:
    """``clients`` concurrent clients, one request in ``bad_every`` a hostile one; counts 5xx."""
    bad = _bad_requests()

    def request(i: int) -> dict[str, Any]:
        return bad[i // bad_every % len(bad)] if i % bad_every == 0 else _image(pngs[i % len(pngs)])

    lat, statuses, elapsed = await _drive(url, clients, max_requests, max_seconds, request)
    return {"clients": clients, "requests": len(lat), "seconds": round(elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "statuses": dict(sorted(statuses.items())), "5xx": sum(n for c, n in statuses.items() if c >= 500)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=192, help="max requests per client level")
    parser.add_argument("--seconds", type=float, default=40.0, help="max seconds per level (each side)")
    parser.add_argument("--batch-max-size", type=int, default=16)
    parser.add_argument("--soak-seconds", type=float, default=0.0,
                        help="after the levels, a soak of this many seconds: good and hostile requests mixed")
    parser.add_argument("--soak-clients", type=int, default=32)
    parser.add_argument("--soak-requests", type=int, default=20_000, help="max requests of the soak")
    parser.add_argument("--mode", nargs="+", default=["per_backbone"], choices=["per_backbone", "single"],
                        help="deployment_mode(s) to measure")
    parser.add_argument("--in-process-threads", type=int, default=1,
                        help="torch threads of the in-process reference (each encoder replica uses 1); on a "
                             "contended machine 2 OpenMP threads stall each other")
    return parser.parse_args(argv)


def level_row(mode: str, clients: int, url: str, pipeline: InProcess, pngs: list[bytes],
              args: argparse.Namespace) -> dict[str, Any]:
    """One client level: Serve over loopback HTTP, then the in-process pipeline at batch = clients."""
    load_before = os.getloadavg()
    served = asyncio.run(load_test(url, pngs, clients, args.requests, args.seconds))
    local = time_in_process(pipeline, pngs[:args.requests], clients, args.seconds)
    return {"mode": mode, "clients": clients, "serve_req_per_s": round(served["requests_per_s"], 2),
            "p50_ms": round(served["p50_ms"], 1), "p99_ms": round(served["p99_ms"], 1),
            "requests": served["requests"], "statuses": served["statuses"],
            "in_process_img_per_s (batch = clients)": round(local["images_per_s"], 2),
            "in_process_ms_per_batch": round(1e3 * local["seconds"] / max(1, local["images"]) * clients, 1),
            "ratio serve / in-process": round(served["requests_per_s"] / local["images_per_s"], 3),
            "loadavg_1m_before": round(load_before[0], 1)}


def measure_serve(artifact: Path, pipeline: InProcess, pngs: list[bytes], args: argparse.Namespace
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every mode on a local Ray Serve: the client levels' rows and the soaks."""
    import ray
    from ray import serve

    from jobs.runtime import project_runtime_env
    from serve.app import AppArgs, build_app

    ray.init(num_cpus=2, runtime_env=project_runtime_env(), logging_level=logging.WARNING, include_dashboard=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows: list[dict[str, Any]] = []
    soaks: list[dict[str, Any]] = []
    try:
        for mode in args.mode:
            # The app's default reservations (1 CPU in all): what `serve run` gets on this machine.
            serve.run(build_app(AppArgs.model_validate({
                "artifact": str(artifact), "deployment_mode": mode, "torch_threads": 1,
                "batch_max_size": args.batch_max_size})), name="bench", route_prefix="/")
            for clients in args.clients:
                rows.append(level_row(mode, clients, url, pipeline, pngs, args))
                print(rows[-1], flush=True)
            if args.soak_seconds > 0:
                soaked = asyncio.run(soak(url, pngs, args.soak_clients, args.soak_requests, args.soak_seconds))
                soaked.update(mode=mode, ingress_peak_rss_mb=ingress_peak_rss_mb("bench"))
                soaks.append(soaked)
                print("soak", soaked, flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows, soaks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.serve_latency")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.in_process_threads)
    out = out_dir("serve_latency")
    artifact = Path(args.artifact) if args.artifact else fit_small_artifact(out / "artifact", args.image_size)
    ensemble = load_ensemble(artifact)
    dataset = load_dataset("fashion_mnist")
    assert dataset.test is not None
    pngs = [_png(img[0]) for img in dataset.test.images[:max(args.requests, 64)]]
    rows, soaks = measure_serve(artifact, InProcess(ensemble), pngs, args)
    extra = {"artifact": str(artifact), "backbones": ensemble.backbone_names, "image_size": args.image_size,
             "soak": soaks, "loadavg_end": os.getloadavg()}
    md = write_results(out, command, rows, title="Ensemble on Ray Serve: loopback HTTP vs in-process", extra=extra,
                       blocks=[
        f"Backbones {ensemble.backbone_names} at {args.image_size} px; modes {args.mode} (per_backbone: one "
        "replica per encoder, 1 thread; single: the encoders inside the ingress), "
        f"@serve.batch max {args.batch_max_size}; Fashion-MNIST test PNGs; each level at most {args.requests} "
        f"requests and {args.seconds} s per side. In-process: decode + 3 encoders + combiner, "
        f"{args.in_process_threads} torch thread(s), batch = client count. "
        "2 CPU cores shared with other agents: load average per row.\n",
        rows, *(["\n## Soak (one request in 4 hostile)\n", soaks] if soaks else [])])
    line_plot({f"{mode} {q} (ms)": (args.clients, [r[f"{q}_ms"] for r in rows if r["mode"] == mode])
               for mode in args.mode for q in ("p50", "p99")},
              out / "serve_latency.png", "Serve latency vs concurrent clients", "clients", "ms")
    print(md)
    return {"command": command, "rows": rows, **extra}


if __name__ == "__main__":
    main()
