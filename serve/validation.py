"""HTTP request parsing and validation for the ensemble service (no Ray, no model).

Every problem with a request becomes a :class:`RequestError` carrying the 4xx status,
a short machine-readable ``error`` code and a ``detail`` sentence naming the bad value;
the ingress turns it into the JSON body ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

#: Content types ``POST /v1/classify`` accepts (besides raw ``image/*`` bodies).
MULTIPART, JSON_TYPE = "multipart/form-data", "application/json"


class RequestError(Exception):
    """A client error: HTTP ``status`` (4xx), ``error`` code and a ``detail`` message."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


@dataclass(frozen=True)
class ClassifyRequest:
    """A parsed classification request: the encoded image bytes and how many classes to return."""

    image: bytes
    top_k: int | None
    source: str  # "multipart", "json" or "raw"


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Require ``Authorization: Bearer <expected>`` when a key is configured.

    Raises:
        RequestError: 401 when the header is missing, not a bearer token, or wrong.
    """
    if not expected:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization:
        raise RequestError(401, "unauthorized", "missing Authorization header; send 'Authorization: Bearer <key>'",
                           challenge)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError(401, "unauthorized", f"Authorization scheme {scheme!r} is not 'Bearer <key>'", challenge)
    # Constant-time comparison: the response time must not leak how much of the key matched.
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise RequestError(401, "unauthorized", "invalid API key", challenge)


def parse_top_k(value: Any, num_classes: int, default: int) -> int:
    """``top_k`` from a query, form or JSON value; ``None`` gives ``min(default, num_classes)``.

    Raises:
        RequestError: 422 unless an integer in ``[1, num_classes]``.
    """
    if value is None or value == "":
        return min(default, num_classes)
    if isinstance(value, bool):
        raise RequestError(422, "invalid_top_k", f"top_k must be an integer, got {value!r}")
    try:
        k = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        k = None
    if k is None:
        raise RequestError(422, "invalid_top_k", f"top_k must be an integer, got {value!r}")
    if not 1 <= k <= num_classes:
        raise RequestError(422, "invalid_top_k", f"top_k must be between 1 and {num_classes}, got {k}")
    return k


def media_type(content_type: str | None) -> str:
    """The lower-case media type without parameters (``multipart/form-data; boundary=x`` -> ``multipart/form-data``)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_content_type(content_type: str | None) -> str:
    """The media type if ``POST /v1/classify`` accepts it.

    Raises:
        RequestError: 415 naming the type received and the accepted ones.
    """
    kind = media_type(content_type)
    if kind in (MULTIPART, JSON_TYPE) or kind.startswith("image/"):
        return kind
    raise RequestError(415, "unsupported_media_type",
                       f"content type {kind or '(none)'!r} is not accepted; send multipart/form-data with a "
                       "'file' field, application/json with 'image_base64', or a raw image/* body")


def check_declared_length(content_length: str | None, limit: int) -> None:
    """Reject a body whose declared ``Content-Length`` exceeds ``limit`` before reading it.

    Raises:
        RequestError: 413 (too large) or 400 (not a number).
    """
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise RequestError(400, "bad_request", f"Content-Length {content_length!r} is not a number") from None
    if declared > limit:
        raise RequestError(413, "payload_too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Read a streamed body, failing as soon as it passes ``limit`` bytes (chunked uploads too).

    Raises:
        RequestError: 413.
    """
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "payload_too_large", f"body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def decode_base64_image(text: Any, max_bytes: int) -> bytes:
    """Strict base64 (standard alphabet, optional ``data:...;base64,`` prefix) to bytes.

    Raises:
        RequestError: 400 for a missing, non-string or malformed value; 413 for a decoded
            image above ``max_bytes``.
    """
    if not isinstance(text, str):
        raise RequestError(400, "bad_base64", f"image_base64 must be a string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # tolerate line-wrapped base64
    if not text:
        raise RequestError(400, "empty_image", "image_base64 is empty")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "bad_base64", f"image_base64 is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise RequestError(413, "payload_too_large", f"decoded image of {len(data)} bytes exceeds {max_bytes} bytes")
    return data


def parse_json_body(body: bytes, max_bytes: int) -> tuple[bytes, Any]:
    """``{"image_base64": str, "top_k": int?}`` -> ``(image bytes, raw top_k)``.

    Raises:
        RequestError: 400 for invalid JSON, a non-object, a missing or bad ``image_base64``,
            or unknown keys.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "bad_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "bad_json", f"JSON body must be an object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"image_base64", "top_k"})
    if unknown:
        raise RequestError(400, "bad_json", f"unknown keys {unknown}; valid: image_base64, top_k")
    if "image_base64" not in payload:
        raise RequestError(400, "missing_image", "JSON body lacks 'image_base64'")
    return decode_base64_image(payload["image_base64"], max_bytes), payload.get("top_k")
