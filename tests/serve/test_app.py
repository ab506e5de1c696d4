"""The ensemble served on Ray Serve, through real HTTP on loopback.

One application (API key from a Secret-like file, 2 replicas of one encoder) serves a small
artifact fitted in the test from a raw-pixel backbone and a saved random CNN on synthetic
gratings, one of whose class names holds a lone surrogate: classify by multipart, base64
JSON and raw body; labels, health and docs; every bad input class; a corpus of hostile
requests (``HOSTILE``); a burst; the single-deployment mode; and a replica killed while
requests keep coming.
"""

from __future__ import annotations

import base64
import functools
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
from serve.app import safe_text

KEY_ENV = "POLYCLIP_TEST_SERVE_KEY"
KEY = "test-key-0123456789"
MAX_BODY = 150_000
MAX_PIXELS = 1_000_000
BODY_TIMEOUT_S = 2.0


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
    class_names = list(data.class_names)
    class_names[3] += "\ud800"  # a lone surrogate: it must not break /v1/labels or any answer naming it
    ensemble, _ = fit_ensemble(train, data.train.labels[labeled], class_names=class_names, backbones=infos,
                               steps=30, seed=0)
    save_ensemble(root / "ensemble", ensemble)
    logits, weights = ensemble.predict([test["pixels"], test["cnn"]])
    return {"artifact": str(root / "ensemble"), "data": data, "logits": logits, "weights": weights,
            "class_names": [safe_text(name) for name in class_names]}


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
                            ingress_num_cpus=0, batch_max_size=4, top_k=3, body_timeout_s=BODY_TIMEOUT_S))
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
    classify = spec["paths"]["/v1/classify"]["post"]
    assert "multipart/form-data" in classify["requestBody"]["content"]
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "the service's API key"}
    assert classify["security"] == [{"bearerAuth": []}] and "security" not in spec["paths"]["/healthz"]["get"]
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"error", "detail"}
    for code in ("400", "401", "413", "415", "422", "500", "503", "504"):
        assert classify["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}, code
    labels_schema = spec["paths"]["/v1/labels"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert labels_schema == {"$ref": "#/components/schemas/LabelsResponse"}
    assert set(spec["components"]["schemas"]["LabelsResponse"]["required"]) == {"labels", "backbones"}


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


# --- A corpus of hostile requests, as a user or an attacker would try them -------------

def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo() -> Image.Image:
    y, x = np.mgrid[0:40, 0:56]
    return Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).astype(np.uint8))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header claims ``width x height`` (a bomb by its header alone)."""
    data = bytearray(_encode(Image.new("L", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@functools.cache
def _bomb(mode: str, side: int) -> bytes:
    """A PNG of ``side`` x ``side`` zeros: a few KB on the wire, ``side**2`` pixels decoded (made on first use)."""
    return _encode(Image.new(mode, (side, side)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _multipart(body: bytes, boundary: str | None = "xyz") -> dict:
    kind = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return {"content": body, "headers": {"Content-Type": kind}}


def _part(name: str, data: bytes, filename: str | None = "x.png") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--xyz\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + data + b"\r\n"


GOOD = _png(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)))
HUGE = "9" * 5000
#: (id, request keyword arguments for ``client.request`` or a function making them, expected status,
#: expected error code; ``None`` for a 200).
HOSTILE = [
    # top_k: numeric edge cases through JSON, query and form
    ("top_k 5000 digits json", {"content": b'{"image_base64": "%s", "top_k": %s}' % (_b64(GOOD).encode(),
                                                                                     HUGE.encode()),
                                "headers": {"Content-Type": "application/json"}}, 422, "invalid_top_k"),
    ("top_k 5000 digits query", {"files": {"file": ("x.png", GOOD)}, "params": {"top_k": HUGE}}, 422,
     "invalid_top_k"),
    ("top_k 5000 digits form", {"files": {"file": ("x.png", GOOD)}, "data": {"top_k": HUGE}}, 422,
     "invalid_top_k"),
    ("top_k 1e400", {"content": b'{"image_base64": "%s", "top_k": 1e400}' % _b64(GOOD).encode(),
                     "headers": {"Content-Type": "application/json"}}, 422, "invalid_top_k"),
    ("top_k NaN", {"content": b'{"image_base64": "%s", "top_k": NaN}' % _b64(GOOD).encode(),
                   "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
    ("top_k -0", {"files": {"file": ("x.png", GOOD)}, "params": {"top_k": "-0"}}, 422, "invalid_top_k"),
    ("top_k +-3", {"files": {"file": ("x.png", GOOD)}, "params": {"top_k": "+-3"}}, 422, "invalid_top_k"),
    ("top_k arabic digit", {"files": {"file": ("x.png", GOOD)}, "params": {"top_k": "\u0663"}}, 422,
     "invalid_top_k"),
    ("top_k true", {"json": {"image_base64": _b64(GOOD), "top_k": True}}, 422, "invalid_top_k"),
    ("top_k list", {"json": {"image_base64": _b64(GOOD), "top_k": [2]}}, 422, "invalid_top_k"),
    ("top_k 2.0 is 2", {"json": {"image_base64": _b64(GOOD), "top_k": 2.0}}, 200, None),
    # nested and huge JSON
    ("json 70k deep", {"content": b"[" * 70_000 + b"]" * 70_000, "headers": {"Content-Type": "application/json"}},
     400, "bad_json"),
    ("json 5k deep value", {"content": b'{"image_base64": "x", "top_k": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000
                                       + b"}", "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
    ("json lone surrogate key", {"content": b'{"\\ud800": 1}', "headers": {"Content-Type": "application/json"}},
     400, "bad_json"),
    ("json lone surrogate image", {"content": b'{"image_base64": "\\udfff"}',
                                   "headers": {"Content-Type": "application/json"}}, 400, "bad_base64"),
    ("json number as image", {"content": b'{"image_base64": ' + HUGE.encode() + b"}",
                              "headers": {"Content-Type": "application/json"}}, 400, "bad_base64"),
    ("json top-level string", {"json": "image"}, 400, "bad_json"),
    ("json base64 of zeros", {"json": {"image_base64": "A" * 4000}}, 400, "bad_image"),
    # malformed multipart
    ("multipart without boundary", _multipart(_part("file", GOOD) + b"--xyz--\r\n", boundary=None), 400,
     "bad_multipart"),
    ("multipart truncated", _multipart(_part("file", GOOD)[:60]), 400, "bad_multipart"),
    ("multipart two files", _multipart(_part("file", GOOD) + _part("file", GOOD) + b"--xyz--\r\n"), 400,
     "bad_multipart"),
    ("multipart 20 fields", _multipart(b"".join(_part(f"f{i}", b"1", None) for i in range(20)) + b"--xyz--\r\n"),
     400, "bad_multipart"),
    ("multipart garbage", _multipart(os.urandom(2000)), 400, "bad_multipart"),
    ("multipart file as text field", _multipart(_part("file", b"abc", None) + b"--xyz--\r\n"), 400,
     "missing_image"),
    # image modes that must decode, and bombs of several sizes (all one 413)
    ("cmyk jpeg", {"files": {"file": ("x.jpg", _encode(_photo().convert("CMYK"), "JPEG"))}}, 200, None),
    ("16-bit png", {"files": {"file": ("x.png", _encode(Image.fromarray(
        np.linspace(0, 65535, 40 * 56).reshape(40, 56).astype(np.uint16))))}}, 200, None),
    ("palette png", {"files": {"file": ("x.png", _encode(_photo().convert("P")))}}, 200, None),
    ("animated gif", {"files": {"file": ("x.gif", _encode(_photo(), "GIF", save_all=True,
                                                          append_images=[_photo().rotate(90)]))}}, 200, None),
    ("bomb 1200x1200", lambda: {"files": {"file": ("x.png", _bomb("L", 1200))}}, 413,
     "image_too_large"),
    ("bomb 7000x7000", lambda: {"files": {"file": ("x.png", _bomb("1", 7000))}}, 413,
     "image_too_large"),
    ("bomb 10000x10000", lambda: {"files": {"file": ("x.png", _bomb("1", 10000))}}, 413,
     "image_too_large"),
    ("bomb 20000x20000", lambda: {"files": {"file": ("x.png", _bomb("1", 20000))}}, 413,
     "image_too_large"),
    ("jpeg header 65000x65000", {"content": _jpeg_claiming(65000, 65000), "headers": {"Content-Type": "image/jpeg"}},
     413, "image_too_large"),
    ("body of declared size over the limit", {"content": os.urandom(MAX_BODY + 1),
                                              "headers": {"Content-Type": "image/png"}}, 413, "payload_too_large"),
    # auth edge cases
    ("bearer with padding", {"files": {"file": ("x.png", GOOD)}, "headers": {"Authorization": f"Bearer \t  {KEY}"}},
     200, None),
    ("bearer lower case", {"files": {"file": ("x.png", GOOD)}, "headers": {"Authorization": f"bearer {KEY}"}}, 200,
     None),
    ("bearer without token", {"files": {"file": ("x.png", GOOD)}, "headers": {"Authorization": "Bearer"}}, 401,
     "unauthorized"),
    ("basic auth", {"files": {"file": ("x.png", GOOD)}, "headers": {"Authorization": f"Basic {KEY}"}}, 401,
     "unauthorized"),
    ("key prefix", {"files": {"file": ("x.png", GOOD)}, "headers": {"Authorization": f"Bearer {KEY[:-1]}"}}, 401,
     "unauthorized"),
    # protocol
    ("unknown path", {"method": "GET", "url": "/v1/nothing"}, 404, "http_error"),
    ("wrong method", {"method": "GET", "url": "/v1/classify"}, 405, "http_error"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_a_json_answer_never_a_5xx(server, case):
    _, make, status, error = case
    kwargs = dict(make() if callable(make) else make)
    method, url = kwargs.pop("method", "POST"), kwargs.pop("url", "/v1/classify")
    response = server.request(method, url, **kwargs)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()  # valid UTF-8 JSON, even for lone surrogates
    if error is None:
        assert body["labels"] and len(body["labels"]) == len(body["probabilities"])
        return
    assert body["error"] == error and body["detail"], body
    assert body["request_id"] and response.headers["x-request-id"] == body["request_id"]  # one id, logged too
    assert len(response.content) < 2_000  # nothing the client sent is echoed back whole


def _raw_http(port: int, head: bytes, body_parts: list[bytes], pause_s: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            time.sleep(pause_s)
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed first
                break
        sock.settimeout(30)
        received = b""
        while b"\r\n\r\n" not in received:  # the head; the proxy may hold the body while the request is open
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_a_slow_body_gets_408_and_the_app_keeps_serving(server):
    port = server.base_url.port
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(GOOD)).encode() + b"\r\n\r\n")
    started = time.monotonic()
    answer = _raw_http(port, head, [GOOD[:10]], pause_s=0.1)  # then nothing more: a slowloris body
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"content-type: application/json" in answer.lower()  # the app's JSON error, not the proxy's text
    assert BODY_TIMEOUT_S <= time.monotonic() - started < BODY_TIMEOUT_S + 15
    assert _classify_png(server, GOOD).status_code == 200


def test_a_burst_of_concurrent_clients_is_answered(server):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        return _classify_png(server, GOOD if i % 3 else b"not an image").status_code

    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(one, range(48)))
    assert sorted(set(statuses)) == [200, 400], statuses
    assert statuses.count(400) == 16


def test_exif_rotated_image_is_classified_upright(server):
    upright = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise, to be turned clockwise for display
    sideways = _encode(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)
    a = _classify_png(server, _encode(upright), top_k=10).json()
    b = _classify_png(server, sideways, top_k=10).json()
    assert a["labels"] == b["labels"]
    assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_encoders_use_the_cpu_when_no_gpu_was_reserved(server):
    from ray import serve

    handle = serve.get_deployment_handle("Encoder_cnn", app_name="ensemble")
    assert handle.device_name.remote().result(timeout_s=60) == "cpu"


def test_single_deployment_mode_serves_the_same_answers_without_a_key_on_loopback(server, fitted):
    import httpx
    from ray import serve

    from serve.app import AppArgs, _serve_http_host, build_app

    assert _serve_http_host() == "127.0.0.1"  # what the ingress reads to decide whether a key is required
    app = build_app(AppArgs(artifact=fitted["artifact"], api_key_env="POLYCLIP_TEST_UNSET_KEY",
                            deployment_mode="single", ingress_num_cpus=0, top_k=3))
    serve.run(app, name="single", route_prefix="/single")
    try:
        with httpx.Client(base_url=server.base_url.join("/single"), timeout=60.0) as open_client:
            for i in range(3):
                png = _png(fitted["data"].test.images[i, 0])
                body = _classify_png(open_client, png, top_k=10).json()
                assert body["labels"][0] == fitted["class_names"][int(fitted["logits"][i].argmax())]
                assert body["backbone_weights"]["pixels"] == pytest.approx(float(fitted["weights"][i, 0]),
                                                                           abs=1e-4)
            assert open_client.get("/v1/labels").json()["labels"] == fitted["class_names"]
    finally:
        serve.delete("single")


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
