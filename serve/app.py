"""The adaptive ensemble on Ray Serve: a FastAPI ingress and the member encoders.

Development::

    serve run serve.app:build_app artifact=runs/<name>/ensemble [cascade_threshold=0.9]

Production: ``serve deploy serve/config.yaml`` (same builder, typed :class:`AppArgs`).

Graph. ``deployment_mode: per_backbone`` (default) runs one ``Encoder_<backbone>``
deployment per member, called through deployment handles in parallel (or, with a cascade
threshold, cheapest first until the partial ensemble is confident), each batching
concurrent requests with ``@serve.batch``. ``deployment_mode: single`` keeps every
encoder inside the ingress replica (no handle hops: the lowest latency for a small
ensemble on one machine). Either way the ``Ingress`` decodes each image once
(:mod:`serve.decode`) and combines the features with the artifact's
:class:`polyclip.ensemble.Ensemble`. HTTP API:

* ``POST /v1/classify``: multipart (field ``file``), JSON ``{"image_base64", "top_k"}``
  or a raw ``image/*`` body; ``top_k`` also as a query or form field. Answers labels,
  probabilities, each backbone's weight for this image, which backbones ran, and latency.
* ``GET /v1/labels``, ``GET /healthz``, OpenAPI docs at ``/docs`` (``/openapi.json``).

Every bad input gets a 4xx JSON ``{"error", "detail", "request_id"}`` (see
:mod:`serve.validation`); anything unexpected a logged JSON 500 with its request id.
Auth fails closed (:mod:`serve.auth`): on a non-loopback host the ingress refuses to
start without a key unless ``allow_unauthenticated`` is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from polyclip.data.images import ImageDecodeError
from polyclip.ensemble import Ensemble, load_ensemble
from serve.auth import check_auth_config, load_api_key
from serve.decode import DecodeBusyError, ImageTooLargeError, PixelBudget, decode_for_inputs
from serve.deployments import BackboneEncoder, LocalEncoders, deployment_name, encoder_options, member_image_size
from serve.encoder import Precision
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

__all__ = ["AppArgs", "build_app", "deployment_name", "safe_text"]


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run serve.app:build_app key=value ...``).

    Per-backbone settings take one number for every encoder or a mapping
    ``{backbone name: number}`` (names as in the artifact, e.g. ``efficientnet_lite:0``);
    names not in the mapping get the default. The defaults reserve 1 CPU in all for a
    three-member ensemble, so ``serve run`` and ``serve deploy`` come up on 2 cores.
    """

    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(..., description="ensemble artifact directory written by jobs.ensemble")
    api_key_env: str = Field("POLYCLIP_API_KEY", description="replica environment variable holding the bearer key; "
                                                             "<api_key_env>_FILE may name a file holding it")
    api_key_file: str | None = Field(None, description="file holding the key (a mounted Secret), read by the "
                                                       "replica when neither variable is set")
    allow_unauthenticated: bool = Field(False, description="serve without a key on a non-loopback host")
    deployment_mode: Literal["per_backbone", "single"] = Field(
        "per_backbone", description="one encoder deployment per backbone, or every encoder in the ingress")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest request body accepted (413 above)")
    max_pixels: int = Field(40_000_000, gt=0, description="largest image (width*height) decoded; 413 above")
    decode_threads: int = Field(2, gt=0, description="decode thread pool of each ingress replica")
    decode_budget_pixels: int | None = Field(
        None, gt=0, description="decoded pixels held at once per ingress replica (default 2 * max_pixels)")
    request_timeout_s: float = Field(30.0, gt=0, description="per request, from headers to answer (504 after)")
    body_timeout_s: float = Field(10.0, gt=0, description="to receive the whole body (408 after: slow clients)")
    max_ongoing_requests: int = Field(32, gt=0, description="requests in one ingress replica at once")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting for the ingress; 503 beyond")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After of 503 answers")
    cascade_threshold: float | None = Field(
        None, ge=0, description="stop calling backbones once the partial ensemble's max probability reaches it; "
                                "null calls every backbone in parallel")
    top_k: int = Field(5, gt=0, description="default number of classes returned")
    num_replicas: int | dict[str, int] = Field(1, description="encoder replicas, one number or per backbone")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config of every encoder (replaces num_replicas), "
                          "e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}")
    num_cpus: float | dict[str, float] = Field(0.25, description="CPUs per encoder replica")
    num_gpus: float | dict[str, float] = Field(0.0, description="GPUs per encoder replica (1 where present); "
                                                                "single mode: the ingress's")
    precision: Precision = Field("auto", description="encoder inference on CUDA: auto (bf16/fp16), fp32, bf16, "
                                                     "fp16; CPU is always fp32")
    torch_threads: int = Field(1, gt=0, description="intra-op threads per encoder replica")
    ingress_replicas: int = Field(1, gt=0)
    ingress_num_cpus: float = Field(0.25, ge=0)
    batch_max_size: int = Field(16, gt=0, description="@serve.batch max_batch_size of each encoder")
    batch_wait_timeout_s: float = Field(0.002, ge=0, description="@serve.batch batch_wait_timeout_s")

    @field_validator("num_replicas", "num_cpus", "num_gpus", "autoscaling_config", mode="before")
    @classmethod
    def _mapping_from_text(cls, value: Any) -> Any:
        """``serve run ... 'num_gpus={"efficientnet_lite:2": 1}'`` passes the mapping as JSON text."""
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object: {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        budget = self.decode_budget_pixels
        if budget is not None and budget < self.max_pixels:
            raise ValueError(f"decode_budget_pixels={budget} is below max_pixels={self.max_pixels}: an image "
                             "allowed by max_pixels could never be decoded")
        if self.deployment_mode == "single" and isinstance(self.num_gpus, dict):
            raise ValueError(f"deployment_mode=single runs every encoder in the ingress: num_gpus must be one "
                             f"number, got {self.num_gpus}")
        return self

    @property
    def budget_pixels(self) -> int:
        return self.decode_budget_pixels or 2 * self.max_pixels


def safe_text(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes (always encodable as UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: unencodable characters escaped, NaN refused (caught as a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")


class ErrorBody(BaseModel):
    """Every non-2xx answer of the API."""

    error: str = Field(description="machine-readable code, e.g. invalid_top_k, image_too_large")
    detail: str = Field(description="what was wrong, naming the bad value")
    request_id: str | None = Field(None, description="quote it when reporting a 500")


class ClassifyResponse(BaseModel):
    """The answer of ``POST /v1/classify``."""

    labels: list[str] = Field(description="top_k class names, most probable first")
    probabilities: list[float] = Field(description="their ensemble probabilities (softmax over all classes)")
    backbone_weights: dict[str, float] = Field(
        description="each backbone's share for this image, (1/t_b) / sum_k (1/t_k); 0 for backbones not called")
    backbones_called: list[str]
    latency_ms: dict[str, float] = Field(description="decode, encode (fan-out), combine and total, server side")


class LabelsResponse(BaseModel):
    """The answer of ``GET /v1/labels``."""

    labels: list[str] = Field(description="class names in label order")
    backbones: list[str] = Field(description="member backbones in cost order")


class HealthResponse(BaseModel):
    """The answer of ``GET /healthz`` (no key needed; says nothing about labels or auth)."""

    status: Literal["ok"]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    meaning = {400: "bad image, base64, JSON or multipart", 401: "missing or wrong API key",
               408: "body not received in time", 413: "body or image too large", 415: "wrong content type",
               422: "bad top_k", 500: "unexpected error (logged with the request id)",
               503: "busy: queue or decode budget full (Retry-After)", 504: "request timed out"}
    return {code: {"model": ErrorBody, "description": meaning[code]} for code in codes}


api = FastAPI(
    title="polyclip adaptive ensemble",
    version="1",
    description="Few-label image classification by an adaptive ensemble of pretrained backbones "
                "(Rodriguez-Opazo et al. 2024) on Ray Serve. `/v1/*` needs `Authorization: Bearer <key>` "
                "when the service has a key.",
    default_response_class=SafeJSONResponse,
)
BEARER = "bearerAuth"


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the bearer scheme (the routes read the header themselves)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
            "type": "http", "scheme": "bearer", "description": "the service's API key"}
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{BEARER: []}]
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


def _request_id() -> str:
    """Serve's id of the current request (its proxy returns it as ``X-Request-Id`` and logs it)."""
    try:
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id
    except Exception:  # private API: a fresh id still ties the answer to the log line
        request_id = ""
    return request_id or uuid.uuid4().hex


def _error_response(error: RequestError, request_id: str) -> SafeJSONResponse:
    return SafeJSONResponse(error.body(request_id), status_code=error.status, headers=error.headers)


def _internal_error(exc: BaseException, request_id: str, where: str) -> SafeJSONResponse:
    logger.error("request %s: unexpected %s in %s: %s", request_id, type(exc).__name__, where, exc,
                 exc_info=(type(exc), exc, exc.__traceback__))
    return _error_response(RequestError(500, "internal_error", "unexpected error; it was logged under this "
                                                               "request_id"), request_id)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
    fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors())
    return _error_response(RequestError(422, "invalid_request", f"invalid fields: {fields}"), _request_id())


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
    error = RequestError(exc.status_code, "http_error", str(exc.detail), dict(exc.headers or {}))
    return _error_response(error, _request_id())


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> SafeJSONResponse:
    return _internal_error(exc, _request_id(), request.url.path)


def _serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (``None`` when it cannot be read: treated as public)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else str(client.http_config.host)
    except Exception:  # private API: fail closed
        return None


def _member_inputs(ensemble: Ensemble, artifact: str) -> list[tuple[int, int]]:
    inputs = []
    for info in ensemble.backbones:
        prep = info.preprocessing or {}
        size = int(prep.get("image_size") or info.image_size or 0)  # type: ignore[call-overload]
        if size <= 0:
            raise ValueError(f"artifact {artifact}: backbone {info.name!r} has no image size in its preprocessing")
        inputs.append((size, 1 if int(prep.get("in_chans", 3)) == 1 else 3))  # type: ignore[call-overload]
    return inputs


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: authenticates, validates, decodes once, encodes, combines."""

    def __init__(self, artifact: str, encoders: dict[str, DeploymentHandle] | None, options: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.args = AppArgs.model_validate({"artifact": artifact, **options})
        self.api_key = load_api_key(self.args.api_key_env, self.args.api_key_file)
        check_auth_config(self.api_key, _serve_http_host(), self.args.allow_unauthenticated, self.args.api_key_env)
        self.ensemble: Ensemble = load_ensemble(artifact)
        self.names = self.ensemble.backbone_names
        self.class_names = [safe_text(name) for name in self.ensemble.class_names]
        if self.class_names != self.ensemble.class_names:
            logger.warning("artifact %s: class names with unencodable characters are served escaped", artifact)
        self.inputs = _member_inputs(self.ensemble, artifact)
        self.decode_pool = ThreadPoolExecutor(self.args.decode_threads, thread_name_prefix="decode")
        self.budget = PixelBudget(self.args.budget_pixels)
        self.local: LocalEncoders | None = None
        self.handles: list[DeploymentHandle] = []
        if encoders is None:
            self.local = LocalEncoders(self.ensemble.backbones, self.args.precision, self.args.torch_threads,
                                       self.args.batch_max_size, self.args.batch_wait_timeout_s)
        else:
            self.handles = [encoders[name] for name in self.names]
        threshold = self.args.cascade_threshold
        if threshold is not None and self.ensemble.cascade_prefixes != list(range(1, len(self.names) + 1)):
            raise ValueError(f"cascade_threshold={threshold} needs a combiner per prefix; the artifact has "
                             f"{self.ensemble.cascade_prefixes}")

    async def _decode(self, data: bytes, deadline: float) -> dict[tuple[int, int], np.ndarray]:
        loop = asyncio.get_running_loop()
        wait = max(0.0, deadline - time.monotonic())
        call = partial(decode_for_inputs, data, self.inputs, max_pixels=self.args.max_pixels, budget=self.budget,
                       budget_timeout_s=wait)
        try:
            return await loop.run_in_executor(self.decode_pool, call)
        except ImageTooLargeError as exc:
            raise RequestError(413, "image_too_large", str(exc)) from None
        except ImageDecodeError as exc:
            raise RequestError(400, "bad_image", str(exc)) from None
        except DecodeBusyError as exc:
            raise RequestError(503, "busy", str(exc), {"Retry-After": str(math.ceil(self.args.retry_after_s))}
                               ) from None

    async def _encode_remote(self, b: int, image: np.ndarray) -> torch.Tensor:
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

    async def _encode_all(self, inputs: list[np.ndarray]) -> list[torch.Tensor]:
        if self.local is not None:
            features = await self.local.encode_all(inputs)
            return [torch.from_numpy(f)[None] for f in features]
        return list(await asyncio.gather(*(self._encode_remote(b, x) for b, x in enumerate(inputs))))

    async def _encode_one(self, b: int, image: np.ndarray) -> torch.Tensor:
        if self.local is not None:
            return torch.from_numpy(await self.local.encode_one(b, image))[None]
        return await self._encode_remote(b, image)

    async def _classify(self, request: ClassifyRequest, deadline: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        images = await self._decode(request.image, deadline)
        t1 = time.perf_counter()
        inputs = [images[key] for key in self.inputs]
        threshold = self.args.cascade_threshold
        with torch.no_grad():
            if threshold is None:
                features = await self._encode_all(inputs)
                t2 = time.perf_counter()
                logits, weights = self.ensemble(features)
            else:
                features = []
                for b, x in enumerate(inputs):  # cost order
                    features.append(await self._encode_one(b, x))
                    logits, weights = self.ensemble(features)
                    if float(torch.softmax(logits, dim=1).max()) >= threshold:
                        break
                t2 = time.perf_counter()
        probs = torch.softmax(logits[0].float(), dim=0)
        top = torch.topk(probs, request.top_k or min(self.args.top_k, self.ensemble.num_classes))
        t3 = time.perf_counter()
        return ClassifyResponse(
            labels=[self.class_names[i] for i in top.indices.tolist()],
            probabilities=[float(p) for p in top.values],
            backbone_weights={n: float(w) for n, w in zip(self.names, weights[0])},
            backbones_called=self.names[:len(features)],
            latency_ms={"decode": 1e3 * (t1 - t0), "encode": 1e3 * (t2 - t1), "combine": 1e3 * (t3 - t2),
                        "total": 1e3 * (t3 - t0)},
        ).model_dump()

    async def _read_body(self, request: Request) -> bytes:
        try:
            return await asyncio.wait_for(read_limited(request.stream(), self.args.max_body_bytes),
                                          self.args.body_timeout_s)
        except TimeoutError:
            raise RequestError(408, "request_timeout", f"the body was not received within "
                                                       f"{self.args.body_timeout_s} s") from None

    async def _parse(self, request: Request) -> ClassifyRequest:
        check_api_key(self.api_key, request.headers.get("authorization"))
        kind = check_content_type(request.headers.get("content-type"))
        limit = self.args.max_body_bytes
        check_declared_length(request.headers.get("content-length"), limit)
        body = await self._read_body(request)
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

        boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
        if boundary and b"--" + boundary.encode("latin-1", "replace") + b"--" not in body:
            # python-multipart quietly returns an empty form for a body cut short
            raise RequestError(400, "bad_multipart", "multipart body is truncated: its closing boundary is missing")
        try:
            form = await Request(request.scope, receive).form(max_files=1, max_fields=8)
        except Exception as exc:  # python-multipart and Starlette raise several types for malformed bodies
            detail = getattr(exc, "detail", None) or str(exc)
            raise RequestError(400, "bad_multipart", f"malformed multipart body: {str(detail)[:200]}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, "missing_image", f"multipart body needs a file field 'file'; got fields "
                                                         f"{[safe_text(k)[:40] for k in sorted(form.keys())][:8]}")
            data = await upload.read()
            if not data:
                raise RequestError(400, "empty_image", "the uploaded file is empty")
            form_k = form.get("top_k")
            raw_k = form_k if isinstance(form_k, str) else query_k
            return ClassifyRequest(data, parse_top_k(raw_k, self.ensemble.num_classes, self.args.top_k), "multipart")
        finally:
            await form.close()

    @api.post("/v1/classify", response_model=ClassifyResponse,
              responses=_errors(400, 401, 408, 413, 415, 422, 500, 503, 504),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                      "file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer"}}}},
                  "application/json": {"schema": {"type": "object", "required": ["image_base64"], "properties": {
                      "image_base64": {"type": "string"}, "top_k": {"type": "integer"}}}},
                  "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def classify(self, request: Request) -> SafeJSONResponse:
        """Classify one image; ``top_k`` as a query, form or JSON field."""
        request_id = _request_id()
        deadline = time.monotonic() + self.args.request_timeout_s
        try:
            async with asyncio.timeout(self.args.request_timeout_s):
                parsed = await self._parse(request)
                answer = await self._classify(parsed, deadline)
            return SafeJSONResponse(answer)
        except RequestError as exc:
            return _error_response(exc, request_id)
        except TimeoutError:
            return _error_response(RequestError(504, "timeout", f"no answer within {self.args.request_timeout_s} s"),
                                   request_id)
        except Exception as exc:
            return _internal_error(exc, request_id, "/v1/classify")

    @api.get("/v1/labels", response_model=LabelsResponse, responses=_errors(401, 500))
    async def labels(self, request: Request) -> SafeJSONResponse:
        """Class names in label order, and the member backbones in cost order."""
        request_id = _request_id()
        try:
            check_api_key(self.api_key, request.headers.get("authorization"))
            return SafeJSONResponse(LabelsResponse(labels=self.class_names, backbones=self.names).model_dump())
        except RequestError as exc:
            return _error_response(exc, request_id)
        except Exception as exc:
            return _internal_error(exc, request_id, "/v1/labels")

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> dict[str, str]:
        """Liveness: no key needed, and nothing revealed (not even whether auth is on)."""
        return {"status": "ok"}


def build_app(args: AppArgs | dict[str, Any]) -> serve.Application:
    """The Serve application for an ensemble artifact (``serve run`` / ``serve deploy`` builder).

    The API key is *not* read here: each ingress replica reads it from its own
    environment or key file (:mod:`serve.auth`), so it never enters the Serve config.

    Args:
        args: :class:`AppArgs` or its fields as a dict (``serve run`` passes strings).

    Raises:
        polyclip.ensemble.EnsembleArtifactError: The artifact is missing or broken (checked
            here, before any replica starts).
        ValueError: Per-backbone settings name a backbone the artifact lacks, or an
            autoscaling_config Serve rejects.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    ensemble = load_ensemble(args.artifact)
    options = args.model_dump(exclude={"artifact"})
    ingress_options: dict[str, Any] = {
        "num_replicas": args.ingress_replicas, "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "ray_actor_options": {"num_cpus": args.ingress_num_cpus},
    }
    try:
        from ray.serve.config import BackpressureConfig

        ingress_options["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s)
    except ImportError:  # pragma: no cover - older Serve: 503 without Retry-After
        pass
    encoders: dict[str, Any] | None = None
    if args.deployment_mode == "single":
        ingress_options["ray_actor_options"]["num_gpus"] = float(args.num_gpus)  # type: ignore[arg-type]
    else:
        encoders = {info.name: BackboneEncoder.options(  # type: ignore[attr-defined]
            **encoder_options(args, info, ensemble.backbone_names)).bind(
                info.spec, member_image_size(info), info.num_features,
                args.batch_max_size, args.batch_wait_timeout_s, args.torch_threads, args.precision)
            for info in ensemble.backbones}
    return Ingress.options(**ingress_options).bind(  # type: ignore[attr-defined]
        str(Path(args.artifact).resolve()), encoders, options)
