"""HTTP request parsing and validation for the ensemble service (no Ray, no model).

Every problem with a request becomes a :class:`RequestError` carrying the 4xx status,
a short machine-readable ``error`` code and a ``detail`` sentence naming the bad value
(shortened: a client's 5,000-digit number is not echoed back whole); the ingress turns it
into the JSON body ``{"error": ..., "detail": ..., "request_id": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
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

    def body(self, request_id: str | None = None) -> dict[str, str]:
        """The JSON error body (``request_id`` added when given)."""
        out = {"error": self.error, "detail": self.detail}
        if request_id is not None:
            out["request_id"] = request_id
        return out


#: Longest rendering of a client's value inside an error detail.
MAX_ECHO = 60
#: Longest integer (in digits) a JSON body or a ``top_k`` field may carry.
MAX_INT_DIGITS = 32


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was (safe to echo to a client)."""
    text = repr(value) if not isinstance(value, _LongInt) else f"<{len(value.digits)}-digit number>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class _LongInt:
    """A JSON integer too long to convert (Python refuses above 4,300 digits; nobody needs 33)."""

    def __init__(self, digits: str) -> None:
        self.digits = digits


_INTEGER = re.compile(r"\s*[+-]?([0-9]+)\s*", re.ASCII)


def _parse_int(text: str) -> int | _LongInt:
    return _LongInt(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


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
    expected = (expected or "").strip()
    if not expected:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization or not authorization.strip():
        raise RequestError(401, "unauthorized", "missing Authorization header; send 'Authorization: Bearer <key>'",
                           challenge)
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError(401, "unauthorized", f"Authorization scheme {short_repr(scheme, 20)} is not "
                                                "'Bearer <key>'", challenge)
    # Constant-time comparison: the response time must not leak how much of the key matched.
    # Both sides stripped: a key read from a Secret file usually ends with a newline.
    if not hmac.compare_digest(token.strip().encode("utf-8", "surrogatepass"), expected.encode("utf-8")):
        raise RequestError(401, "unauthorized", "invalid API key", challenge)


def parse_top_k(value: Any, num_classes: int, default: int) -> int:
    """``top_k`` from a query, form or JSON value; ``None`` gives ``min(default, num_classes)``.

    Raises:
        RequestError: 422 unless an integer in ``[1, num_classes]`` (huge numbers, NaN,
            infinities, booleans, lists and text included).
    """
    if value is None or value == "":
        return min(default, num_classes)
    digits = _INTEGER.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, _LongInt) or (digits is not None and len(digits.group(1)) > MAX_INT_DIGITS):
        raise RequestError(422, "invalid_top_k", f"top_k must be between 1 and {num_classes}, got "
                                                 f"{short_repr(value)}")
    k: int | None = None
    if digits is not None:
        k = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        k = int(value)
    if k is None:
        raise RequestError(422, "invalid_top_k", f"top_k must be an integer, got {short_repr(value)}")
    if not 1 <= k <= num_classes:
        raise RequestError(422, "invalid_top_k", f"top_k must be between 1 and {num_classes}, got {short_repr(k)}")
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
                       f"content type {short_repr(kind) if kind else '(none)'} is not accepted; send "
                       "multipart/form-data with a 'file' field, application/json with 'image_base64', "
                       "or a raw image/* body")


def check_declared_length(content_length: str | None, limit: int) -> None:
    """Reject a body whose declared ``Content-Length`` exceeds ``limit`` before reading it.

    Raises:
        RequestError: 413 (too large) or 400 (not a number).
    """
    if content_length is None:
        return
    text = content_length.strip()
    if not text.isdigit() or not text.isascii() or len(text) > MAX_INT_DIGITS:
        raise RequestError(400, "bad_request", f"Content-Length {short_repr(content_length)} is not a number")
    declared = int(text)
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
    if len(text) > 2 * max_bytes + 1024:  # base64 is 4/3 the size: far above, no need to decode it
        raise RequestError(413, "payload_too_large", f"image_base64 of {len(text)} characters exceeds the "
                                                     f"limit of {max_bytes} bytes")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # tolerate line-wrapped base64
    if not text:
        raise RequestError(400, "empty_image", "image_base64 is empty")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # non-ASCII text (a lone surrogate too) is a ValueError
        raise RequestError(400, "bad_base64", f"image_base64 is not valid base64: {short_repr(str(exc), 120)}"
                           ) from None
    if len(data) > max_bytes:
        raise RequestError(413, "payload_too_large", f"decoded image of {len(data)} bytes exceeds {max_bytes} bytes")
    return data


def parse_json_body(body: bytes, max_bytes: int) -> tuple[bytes, Any]:
    """``{"image_base64": str, "top_k": int?}`` -> ``(image bytes, raw top_k)``.

    Integers longer than :data:`MAX_INT_DIGITS` digits are kept aside (``top_k`` then
    gets 422), ``NaN`` and ``Infinity`` are refused, and nesting too deep for the parser
    is a 400 rather than a crash.

    Raises:
        RequestError: 400 for invalid or too deeply nested JSON, a non-object, a missing or
            bad ``image_base64``, or unknown keys.
    """
    try:
        payload = json.loads(body, parse_int=_parse_int, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(400, "bad_json", "JSON body is nested too deeply; send "
                                            '{"image_base64": ..., "top_k": ...}') from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise RequestError(400, "bad_json", f"body is not valid JSON: {short_repr(str(exc), 200)}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "bad_json", f"JSON body must be an object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"image_base64", "top_k"})
    if unknown:
        raise RequestError(400, "bad_json", f"unknown keys {short_repr(unknown)}; valid: image_base64, top_k")
    if "image_base64" not in payload:
        raise RequestError(400, "missing_image", "JSON body lacks 'image_base64'")
    return decode_base64_image(payload["image_base64"], max_bytes), payload.get("top_k")
