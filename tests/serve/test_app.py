"""The ensemble served on Ray Serve, through real HTTP on loopback.

One application (API key on, 2 replicas of one encoder) serves a small artifact fitted in
the test from a raw-pixel backbone and a saved random CNN on synthetic gratings: classify
by multipart, base64 JSON and raw body; labels, health and docs; every bad input class;
and a replica killed while requests keep coming.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from polyclip.backbones import create_backbone, save_backbone
from polyclip.data.datasets import make_synthetic
from polyclip.ensemble import BackboneInfo, fit_ensemble, save_ensemble
from polyclip.features.cache import encode_images

KEY_ENV = "POLYCLIP_TEST_SERVE_KEY"
KEY = "test-key-0123456789"
MAX_BODY = 150_000
MAX_PIXELS = 1_000_000


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An artifact over ``pixels`` and ``cnn`` plus in-process reference predictions."""
    root = tmp_path_factory.mktemp("serve")
    data = make_synthetic(train_size=200, test_size=40, seed=0)
    torch.manual_seed(0)
    save_backbone(create_backbone("random:small_cnn@8"), root / "cnn")
    specs = {"pixels": "pixels", "cnn": f"checkpoint:{root / 'cnn'}"}
    labeled = np.concatenate([np.flatnonzero(data.train.labels == c)[:4] for c in range(10)])
    train, test, infos = {}, {}, {}
    for name, spec in specs.items():
        backbone = create_backbone(spec)
        train[name] = encode_images(backbone, data.train.images[labeled])
        test[name] = encode_images(backbone, data.test.images)
        infos[name] = BackboneInfo.from_backbone(backbone, name=name)
    ensemble, _ = fit_ensemble(train, data.train.labels[labeled], class_names=data.class_names, backbones=infos,
                               steps=30, seed=0)
    save_ensemble(root / "ensemble", ensemble)
    logits, weights = ensemble.predict([test["pixels"], test["cnn"]])
    return {"artifact": str(root / "ensemble"), "data": data, "logits": logits, "weights": weights,
            "class_names": data.class_names}


@pytest.fixture(scope="module")
def server(fresh_ray_cluster, fitted, tmp_path_factory):
    import httpx
    from ray import serve

    from serve.app import AppArgs, build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(f"  {KEY}\n")  # as a Kubernetes Secret file: whitespace around the key
    app = build_app(AppArgs(artifact=fitted["artifact"], api_key_env=KEY_ENV, api_key_file=str(key_file),
                            max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, num_replicas={"cnn": 2}, num_cpus=0,
                            ingress_num_cpus=0, batch_max_size=4, top_k=3))
    serve.run(app, name="ensemble", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0,
                          headers={"Authorization": f"Bearer {KEY}"})
    yield client
    client.close()
    serve.delete("ensemble")
    serve.shutdown()


def _classify_png(client, png: bytes, **params):
    return client.post("/v1/classify", files={"file": ("x.png", png, "image/png")}, params=params)


def test_classify_multipart_base64_and_raw_match_in_process(server, fitted):
    data = fitted["data"]
    names = fitted["class_names"]
    for i in range(3):
        png = _png(data.test.images[i, 0])
        expected = names[int(fitted["logits"][i].argmax())]
        multipart = _classify_png(server, png, top_k=10)
        assert multipart.status_code == 200, multipart.text
        body = multipart.json()
        assert body["labels"][0] == expected and len(body["labels"]) == 10
        assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert body["probabilities"] == sorted(body["probabilities"], reverse=True)
        assert set(body["backbone_weights"]) == {"pixels", "cnn"}
        assert sum(body["backbone_weights"].values()) == pytest.approx(1.0, abs=1e-5)
        assert body["backbone_weights"]["pixels"] == pytest.approx(float(fitted["weights"][i, 0]), abs=1e-4)
        assert body["backbones_called"] == ["pixels", "cnn"] and body["latency_ms"]["total"] > 0

        as_json = server.post("/v1/classify", json={"image_base64": base64.b64encode(png).decode(), "top_k": 2})
        assert as_json.status_code == 200, as_json.text
        assert as_json.json()["labels"] == body["labels"][:2]
        raw = server.post("/v1/classify", content=png, headers={"Content-Type": "image/png"})
        assert raw.status_code == 200 and len(raw.json()["labels"]) == 3  # the app's default top_k
        form_k = server.post("/v1/classify", files={"file": ("x.png", png, "image/png")}, data={"top_k": "1"})
        assert form_k.status_code == 200 and form_k.json()["labels"] == body["labels"][:1]


def test_labels_health_and_docs(server, fitted):
    labels = server.get("/v1/labels")
    assert labels.status_code == 200 and labels.json() == {"labels": fitted["class_names"],
                                                           "backbones": ["pixels", "cnn"]}
    health = server.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # nothing about auth
    docs = server.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = server.get("/openapi.json").json()
    assert "/v1/classify" in spec["paths"] and "/v1/labels" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]


def test_every_bad_input_gets_its_4xx_and_the_app_keeps_serving(server, fitted):
    good = _png(fitted["data"].test.images[0, 0])
    bomb = _png(np.zeros((1200, 1200), dtype=np.uint8))  # 1.44 Mpx > MAX_PIXELS, a few KB on the wire
    cases = [
        ("no key", lambda: server.post("/v1/classify", files={"file": ("x.png", good)},
                                       headers={"Authorization": ""}), 401, "unauthorized"),
        ("wrong key", lambda: server.post("/v1/classify", files={"file": ("x.png", good)},
                                          headers={"Authorization": "Bearer nope"}), 401, "unauthorized"),
        ("labels without key", lambda: server.get("/v1/labels", headers={"Authorization": ""}), 401, "unauthorized"),
        ("not an image", lambda: _classify_png(server, b"hello, this is text"), 400, "bad_image"),
        ("truncated", lambda: _classify_png(server, good[: len(good) // 2]), 400, "bad_image"),
        ("empty file", lambda: _classify_png(server, b""), 400, "empty_image"),
        ("empty raw", lambda: server.post("/v1/classify", content=b"", headers={"Content-Type": "image/png"}),
         400, "empty_image"),
        ("body too large", lambda: _classify_png(server, os.urandom(MAX_BODY + 10)), 413, "payload_too_large"),
        ("decompression bomb", lambda: _classify_png(server, bomb), 413, "image_too_large"),
        ("wrong content type", lambda: server.post("/v1/classify", content=good,
                                                   headers={"Content-Type": "text/plain"}), 415,
         "unsupported_media_type"),
        ("bad base64", lambda: server.post("/v1/classify", json={"image_base64": "not*base64!"}), 400, "bad_base64"),
        ("base64 of text", lambda: server.post("/v1/classify", json={"image_base64": "aGVsbG8="}), 400, "bad_image"),
        ("bad json", lambda: server.post("/v1/classify", content=b"{not json",
                                         headers={"Content-Type": "application/json"}), 400, "bad_json"),
        ("json without image", lambda: server.post("/v1/classify", json={"top_k": 1}), 400, "missing_image"),
        ("multipart without file", lambda: server.post("/v1/classify", files={"other": ("x.png", good)}), 400,
         "missing_image"),
        ("top_k zero", lambda: _classify_png(server, good, top_k=0), 422, "invalid_top_k"),
        ("top_k too big", lambda: _classify_png(server, good, top_k=11), 422, "invalid_top_k"),
        ("top_k text", lambda: server.post("/v1/classify", json={"image_base64": base64.b64encode(good).decode(),
                                                                 "top_k": "three"}), 422, "invalid_top_k"),
    ]
    for label, call, status, error in cases:
        response = call()
        assert response.status_code == status, (label, response.status_code, response.text)
        body = response.json()
        assert body["error"] == error and body["detail"], (label, body)
    after = _classify_png(server, good)
    assert after.status_code == 200, after.text


def _encoder_replicas(name: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if f"#{name}#" in a["name"] and a["name"].startswith("SERVE_REPLICA"))


def _running(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.mark.timeout(240)
def test_killed_encoder_replica_is_replaced_while_requests_are_answered(server, fitted):
    import ray

    replicas = _encoder_replicas("Encoder_cnn")
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    png = _png(fitted["data"].test.images[1, 0])
    statuses = []
    deadline = time.monotonic() + 90
    replaced = False
    while time.monotonic() < deadline and len(statuses) < 400:
        statuses.append(_classify_png(server, png).status_code)
        current = _encoder_replicas("Encoder_cnn")
        if len(statuses) >= 10 and victim not in current and len(current) == 2 and _running("ensemble",
                                                                                         "Encoder_cnn") == 2:
            replaced = True
            break
    assert statuses and all(s == 200 for s in statuses), statuses
    assert replaced, f"the killed replica was not replaced within 90 s: {_encoder_replicas('Encoder_cnn')}"
    assert _classify_png(server, png).status_code == 200
