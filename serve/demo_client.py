"""The end of ``make demo``: serve a fitted ensemble, classify images over HTTP, shut down.

Run as a Ray job on the demo's head (``ray job submit ... -- python -m serve.demo_client
--artifact runs/<name>/ensemble``) or against any cluster (``RAY_ADDRESS``). Starts Serve's
HTTP proxy on a loopback port, deploys ``serve.app:build_app`` (one encoder deployment per
backbone), sends a few real photos from ``skimage.data`` and Fashion-MNIST test images
through ``POST /v1/classify``, prints true vs predicted labels with each backbone's
weight, then deletes the application and stops Serve.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import sys
import time
from typing import Any

import httpx
import numpy as np
from PIL import Image

PHOTOS = ("chelsea", "coffee", "astronaut")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _weights(body: dict[str, Any]) -> str:
    return " ".join(f"{name.split(':')[-1]}={w:.2f}" for name, w in body["backbone_weights"].items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, help="ensemble artifact directory")
    parser.add_argument("--num-test", type=int, default=6, help="Fashion-MNIST test images to send")
    parser.add_argument("--cascade-threshold", type=float, default=None)
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: a free loopback port)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from skimage import data as skdata

    from polyclip.data.datasets import load_dataset
    from serve.app import AppArgs, build_app

    ray.init(logging_level=logging.WARNING)  # inside `ray job submit`: the job's cluster; else RAY_ADDRESS or local
    port = args.port or _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.perf_counter()
    # The default reservations (1 CPU in all for three encoders and the ingress) fit on 2 cores.
    serve.run(build_app(AppArgs.model_validate({
        "artifact": args.artifact, "cascade_threshold": args.cascade_threshold, "top_k": 3})),
        name="polyclip-demo", route_prefix="/")
    print(f"== served {args.artifact} on http://127.0.0.1:{port} in {time.perf_counter() - started:.1f} s")
    failures = 0
    try:
        key = os.environ.get("POLYCLIP_API_KEY", "").strip()  # the replicas read the same variable, if set
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0, headers=headers) as client:
            print("GET /healthz ->", client.get("/healthz").json())
            labels = client.get("/v1/labels").json()
            print("GET /v1/labels ->", labels["labels"])
            print("\n== real photos (skimage.data). Fashion-MNIST has only clothing classes, so these\n"
                  "   labels are not expected to be right: this checks the HTTP path on real photos.")
            for name in PHOTOS:
                response = client.post("/v1/classify", files={"file": (f"{name}.png", _png(getattr(skdata, name)()),
                                                                         "image/png")})
                body = response.json()
                if response.status_code != 200:
                    failures += 1
                    print(f"  {name:10s} HTTP {response.status_code}: {body}")
                    continue
                top = ", ".join(f"{lab} {p:.2f}" for lab, p in zip(body["labels"], body["probabilities"]))
                print(f"  {name:10s} -> {top}  | weights {_weights(body)} | {body['latency_ms']['total']:.0f} ms")
            dataset = load_dataset("fashion_mnist")
            assert dataset.test is not None
            rng = np.random.default_rng(0)
            picks = rng.choice(len(dataset.test), size=args.num_test, replace=False)
            print(f"\n== {args.num_test} Fashion-MNIST test images (true -> predicted)")
            correct = 0
            for i in picks:
                image = dataset.test.images[i, 0]
                truth = dataset.class_names[int(dataset.test.labels[i])]
                response = client.post("/v1/classify", files={"file": ("x.png", _png(image), "image/png")})
                body = response.json()
                if response.status_code != 200:
                    failures += 1
                    print(f"  #{i}: HTTP {response.status_code}: {body}")
                    continue
                correct += body["labels"][0] == truth
                print(f"  #{i:5d} {truth:12s} -> {body['labels'][0]:12s} p={body['probabilities'][0]:.2f} "
                      f"| weights {_weights(body)} | called {len(body['backbones_called'])} | "
                      f"{body['latency_ms']['total']:.0f} ms")
            print(f"  {correct}/{args.num_test} correct")
            bad = client.post("/v1/classify", content=b"not an image", headers={"Content-Type": "image/png"})
            print(f"\n== a non-image body -> HTTP {bad.status_code} {bad.json()}")
            failures += bad.status_code != 400
    finally:
        serve.delete("polyclip-demo")
        serve.shutdown()
        print("== serving shut down")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
