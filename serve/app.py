"""The adaptive ensemble on Ray Serve: one deployment per backbone, a FastAPI ingress.

Development::

    serve run serve.app:build_app artifact=runs/<name>/ensemble [cascade_threshold=0.9]

Production: ``serve deploy serve/config.yaml`` (same builder, typed :class:`AppArgs`).

Graph: the ``Ingress`` deployment decodes each image once per preprocessing (size and
channels of the member backbones, with :func:`polyclip.data.images.decode_image` and its
pixel limit), sends it to every ``Encoder_<backbone>`` deployment through deployment
handles in parallel (or, with a cascade threshold, cheapest first until the partial
ensemble is confident), and combines the features with the artifact's
:class:`polyclip.ensemble.Ensemble`. Encoders batch concurrent requests with
``@serve.batch``. HTTP API:

* ``POST /v1/classify``: multipart (field ``file``), JSON ``{"image_base64", "top_k"}``
  or a raw ``image/*`` body; ``top_k`` also as a query or form field. Answers labels,
  probabilities, each backbone's weight for this image, which backbones ran, and latency.
* ``GET /v1/labels``, ``GET /healthz``, OpenAPI docs at ``/docs`` (``/openapi.json``).

Every bad input gets a 4xx JSON ``{"error", "detail"}`` (see :mod:`serve.validation`).
When the environment variable named by ``api_key_env`` is set (in the replica, or in the
process that builds the app, which forwards it), ``/v1/*`` needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from polyclip.backbones import create_backbone
from polyclip.data.images import ImageDecodeError, decode_image
from polyclip.ensemble import Ensemble, load_ensemble
from serve.validation import (
    ClassifyRequest,
    RequestError,
    check_api_key,
    check_content_type,
    check_declared_length,
    parse_json_body,
    parse_top_k,
    read_limited,
)

logger = logging.getLogger("ray.serve")

PerBackbone = dict[str, float]


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run serve.app:build_app key=value ...``).

    Per-backbone settings take one number for every encoder or a mapping
    ``{backbone name: number}`` (names as in the artifact, e.g. ``efficientnet_lite:0``);
    names not in the mapping get the default.
    """

    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(..., description="ensemble artifact directory written by jobs.ensemble")
    api_key_env: str = Field("POLYCLIP_API_KEY", description="environment variable holding the bearer API key")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest request body accepted (413 above)")
    max_pixels: int = Field(40_000_000, gt=0, description="largest decoded image (width*height), bombs are 400")
    cascade_threshold: float | None = Field(
        None, ge=0, description="stop calling backbones once the partial ensemble's max probability reaches it; "
                                "null calls every backbone in parallel")
    top_k: int = Field(5, gt=0, description="default number of classes returned")
    num_replicas: int | dict[str, int] = Field(1, description="encoder replicas, one number or per backbone")
    num_cpus: float | dict[str, float] = Field(1.0, description="CPUs per encoder replica")
    num_gpus: float | dict[str, float] = Field(0.0, description="GPUs per encoder replica (set 1 where present)")
    torch_threads: int = Field(1, gt=0, description="intra-op threads per encoder replica")
    ingress_replicas: int = Field(1, gt=0)
    ingress_num_cpus: float = Field(0.5, ge=0)
    batch_max_size: int = Field(16, gt=0, description="@serve.batch max_batch_size of each encoder")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="@serve.batch batch_wait_timeout_s")


def deployment_name(backbone: str) -> str:
    """The Serve deployment of one member: ``efficientnet_lite:0`` -> ``Encoder_efficientnet_lite_0``."""
    return "Encoder_" + re.sub(r"[^A-Za-z0-9_]+", "_", backbone).strip("_")


def _per_backbone(value: float | dict[str, Any], name: str, default: float, field: str,
                  names: Sequence[str]) -> float:
    if not isinstance(value, dict):
        return value
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{field}: unknown backbones {unknown}; the artifact has {list(names)}")
    return value.get(name, default)


@serve.deployment
class BackboneEncoder:
    """One member backbone: batches of uint8 images -> features.

    Args:
        spec: ``create_backbone`` spec from the artifact.
        image_size: Its input size.
        num_features: Expected feature dimension (checked against the artifact).
        batch_max_size, batch_wait_timeout_s: ``@serve.batch`` settings.
        torch_threads: Intra-op threads.
    """

    def __init__(self, spec: str, image_size: int | None, num_features: int, batch_max_size: int,
                 batch_wait_timeout_s: float, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = create_backbone(spec, image_size=image_size).eval().to(self.device)
        if self.backbone.num_features != num_features:
            raise ValueError(f"backbone {spec!r} gives {self.backbone.num_features} features but the artifact's "
                             f"head expects {num_features}: the weights differ from the ones it was fitted on")
        self.encode_batch.set_max_batch_size(batch_max_size)  # type: ignore[attr-defined]
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(images)).to(self.device)
            features = self.backbone.encode(x).float().cpu().numpy()
        return list(features)

    async def __call__(self, image: np.ndarray) -> np.ndarray:
        """Features ``(D,)`` of one ``uint8`` ``(C, S, S)`` image (batched with concurrent calls)."""
        return await self.encode_batch(image)


api = FastAPI(
    title="polyclip adaptive ensemble",
    version="1",
    description="Few-label image classification by an adaptive ensemble of pretrained backbones "
                "(Rodriguez-Opazo et al. 2024), one Ray Serve deployment per backbone.",
)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors())
    return JSONResponse({"error": "invalid_request", "detail": f"invalid fields: {fields}: {exc.errors()}"},
                        status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code)


class ClassifyResponse(BaseModel):
    """The answer of ``POST /v1/classify``."""

    labels: list[str] = Field(description="top_k class names, most probable first")
    probabilities: list[float] = Field(description="their ensemble probabilities (softmax over all classes)")
    backbone_weights: dict[str, float] = Field(
        description="each backbone's share for this image, (1/t_b) / sum_k (1/t_k); 0 for backbones not called")
    backbones_called: list[str]
    latency_ms: dict[str, float] = Field(description="decode, encode (fan-out), combine and total, server side")


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: validates, decodes, fans out to the encoders and combines."""

    def __init__(self, artifact: str, encoders: dict[str, DeploymentHandle], options: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.ensemble: Ensemble = load_ensemble(artifact)
        self.names = self.ensemble.backbone_names
        self.handles = [encoders[name] for name in self.names]
        self.args = AppArgs.model_validate({"artifact": artifact, **options})
        self.api_key = os.environ.get(self.args.api_key_env) or None
        # One decode per distinct (size, channels); members sharing it share the array.
        self.inputs = []
        for info in self.ensemble.backbones:
            prep = info.preprocessing or {}
            size = int(prep.get("image_size") or info.image_size or 0)  # type: ignore[call-overload]
            if size <= 0:
                raise ValueError(f"artifact {artifact}: backbone {info.name!r} has no image size in its preprocessing")
            self.inputs.append((size, 1 if int(prep.get("in_chans", 3)) == 1 else 3))  # type: ignore[call-overload]
        threshold = self.args.cascade_threshold
        if threshold is not None and self.ensemble.cascade_prefixes != list(range(1, len(self.names) + 1)):
            raise ValueError(f"cascade_threshold={threshold} needs a combiner per prefix; the artifact has "
                             f"{self.ensemble.cascade_prefixes}")

    def _decode(self, data: bytes) -> dict[tuple[int, int], np.ndarray]:
        return {key: decode_image(data, key[0], channels=key[1], max_pixels=self.args.max_pixels)
                for key in dict.fromkeys(self.inputs)}

    async def _encode(self, b: int, image: np.ndarray) -> torch.Tensor:
        for attempt in (0, 1):
            try:
                features = await self.handles[b].remote(image)
                return torch.from_numpy(np.asarray(features, dtype=np.float32))[None]
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                # The replica died mid-request: Serve routes the retry to a live (or new) one.
                if attempt:
                    raise
                logger.warning("encoder %s replica died during a request; retrying once", self.names[b])
        raise AssertionError("unreachable")

    async def _classify(self, request: ClassifyRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            images = await asyncio.to_thread(self._decode, request.image)
        except ImageDecodeError as exc:
            status = 413 if "exceeds the limit" in str(exc) else 400
            code = "image_too_large" if status == 413 else ("empty_image" if "empty" in str(exc) else "bad_image")
            raise RequestError(status, code, str(exc)) from None
        t1 = time.perf_counter()
        inputs = [images[key] for key in self.inputs]
        threshold = self.args.cascade_threshold
        with torch.no_grad():
            if threshold is None:
                features = list(await asyncio.gather(*(self._encode(b, x) for b, x in enumerate(inputs))))
                t2 = time.perf_counter()
                logits, weights = self.ensemble(features)
            else:
                features = []
                for b, x in enumerate(inputs):  # cost order
                    features.append(await self._encode(b, x))
                    logits, weights = self.ensemble(features)
                    if float(torch.softmax(logits, dim=1).max()) >= threshold:
                        break
                t2 = time.perf_counter()
        probs = torch.softmax(logits[0].float(), dim=0)
        k = request.top_k or min(self.args.top_k, self.ensemble.num_classes)
        top = torch.topk(probs, k)
        t3 = time.perf_counter()
        return ClassifyResponse(
            labels=[self.ensemble.class_names[i] for i in top.indices.tolist()],
            probabilities=[float(p) for p in top.values],
            backbone_weights={n: float(w) for n, w in zip(self.names, weights[0])},
            backbones_called=self.names[:len(features)],
            latency_ms={"decode": 1e3 * (t1 - t0), "encode": 1e3 * (t2 - t1), "combine": 1e3 * (t3 - t2),
                        "total": 1e3 * (t3 - t0)},
        ).model_dump()

    async def _parse(self, request: Request) -> ClassifyRequest:
        check_api_key(self.api_key, request.headers.get("authorization"))
        kind = check_content_type(request.headers.get("content-type"))
        limit = self.args.max_body_bytes
        check_declared_length(request.headers.get("content-length"), limit)
        body = await read_limited(request.stream(), limit)
        num_classes = self.ensemble.num_classes
        query_k = request.query_params.get("top_k")
        if kind == "application/json":
            image, json_k = parse_json_body(body, limit)
            return ClassifyRequest(image, parse_top_k(json_k if json_k is not None else query_k, num_classes,
                                                      self.args.top_k), "json")
        if kind.startswith("image/"):
            if not body:
                raise RequestError(400, "empty_image", "empty image body")
            return ClassifyRequest(body, parse_top_k(query_k, num_classes, self.args.top_k), "raw")
        return await self._parse_multipart(request, body, query_k)

    async def _parse_multipart(self, request: Request, body: bytes, query_k: str | None) -> ClassifyRequest:
        sent = False

        async def receive() -> dict[str, Any]:  # replay the size-checked body to the form parser
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive).form(max_files=1, max_fields=8)
        except Exception as exc:  # python-multipart raises several types for malformed bodies
            raise RequestError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "missing_image", f"multipart body needs a file field 'file'; got fields "
                                                     f"{sorted(form.keys())}")
        data = await upload.read()
        if not data:
            raise RequestError(400, "empty_image", "the uploaded file is empty")
        form_k = form.get("top_k")
        raw_k = form_k if isinstance(form_k, str) else query_k
        return ClassifyRequest(data, parse_top_k(raw_k, self.ensemble.num_classes, self.args.top_k), "multipart")

    @api.post("/v1/classify", response_model=ClassifyResponse,
              responses={400: {"description": "bad image, base64, JSON or multipart"},
                         401: {"description": "missing or wrong API key"}, 413: {"description": "body too large"},
                         415: {"description": "wrong content type"}, 422: {"description": "bad top_k"}},
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                      "file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer"}}}},
                  "application/json": {"schema": {"type": "object", "required": ["image_base64"], "properties": {
                      "image_base64": {"type": "string"}, "top_k": {"type": "integer"}}}},
                  "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def classify(self, request: Request) -> JSONResponse:
        """Classify one image; ``top_k`` as a query, form or JSON field."""
        try:
            parsed = await self._parse(request)
            return JSONResponse(await self._classify(parsed))
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.get("/v1/labels")
    async def labels(self, request: Request) -> JSONResponse:
        """Class names in label order, and the member backbones in cost order."""
        try:
            check_api_key(self.api_key, request.headers.get("authorization"))
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        return JSONResponse({"labels": self.ensemble.class_names, "backbones": self.names})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness (no API key needed; reveals no labels)."""
        return {"status": "ok", "backbones": len(self.names), "cascade_threshold": self.args.cascade_threshold,
                "auth": self.api_key is not None}


def build_app(args: AppArgs | dict[str, Any]) -> serve.Application:
    """The Serve application for an ensemble artifact (``serve run`` / ``serve deploy`` builder).

    Args:
        args: :class:`AppArgs` or its fields as a dict (``serve run`` passes strings).

    Raises:
        polyclip.ensemble.EnsembleArtifactError: The artifact is missing or broken (checked
            here, before any replica starts).
        ValueError: Per-backbone settings name a backbone the artifact lacks.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    ensemble = load_ensemble(args.artifact)
    names = ensemble.backbone_names
    encoders: dict[str, Any] = {}
    for info in ensemble.backbones:
        replicas = int(_per_backbone(args.num_replicas, info.name, 1, "num_replicas", names))  # type: ignore[arg-type]
        cpus = _per_backbone(args.num_cpus, info.name, 1.0, "num_cpus", names)  # type: ignore[arg-type]
        gpus = _per_backbone(args.num_gpus, info.name, 0.0, "num_gpus", names)  # type: ignore[arg-type]
        image_size = info.image_size or (info.preprocessing or {}).get("image_size")
        encoders[info.name] = BackboneEncoder.options(  # type: ignore[attr-defined]
            name=deployment_name(info.name), num_replicas=replicas,
            ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
            max_ongoing_requests=max(2 * args.batch_max_size, 8),
        ).bind(info.spec, image_size, info.num_features, args.batch_max_size, args.batch_wait_timeout_s,
               args.torch_threads)
    actor_options: dict[str, Any] = {"num_cpus": args.ingress_num_cpus}
    key = os.environ.get(args.api_key_env)
    if key:  # forward the builder's key (serve run) to the ingress replicas
        actor_options["runtime_env"] = {"env_vars": {args.api_key_env: key}}
    options = args.model_dump(exclude={"artifact"})
    return Ingress.options(  # type: ignore[attr-defined]
        num_replicas=args.ingress_replicas, ray_actor_options=actor_options, max_ongoing_requests=256,
    ).bind(os.path.abspath(args.artifact), encoders, options)
