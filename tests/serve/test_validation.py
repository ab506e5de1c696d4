"""Request parsing and validation of the ensemble service, without Ray or a model."""

import asyncio
import base64

import pytest

from serve.app import AppArgs, deployment_name
from serve.validation import (
    RequestError,
    check_api_key,
    check_content_type,
    check_declared_length,
    decode_base64_image,
    parse_json_body,
    parse_top_k,
    read_limited,
)


def _status(call) -> tuple[int, str, str]:
    with pytest.raises(RequestError) as err:
        call()
    return err.value.status, err.value.error, err.value.detail


def test_api_key_is_optional_then_required():
    check_api_key(None, None)
    check_api_key("", "Bearer whatever")
    check_api_key("s3cret", "Bearer s3cret")
    check_api_key("s3cret", "bearer s3cret")
    assert _status(lambda: check_api_key("s3cret", None))[:2] == (401, "unauthorized")
    assert "Basic" in _status(lambda: check_api_key("s3cret", "Basic s3cret"))[2]
    assert _status(lambda: check_api_key("s3cret", "Bearer s3cre"))[2] == "invalid API key"


@pytest.mark.parametrize("value,expected", [(None, 5), ("", 5), ("3", 3), (10, 10), (2.0, 2)])
def test_top_k_valid(value, expected):
    assert parse_top_k(value, 10, default=5) == expected


@pytest.mark.parametrize("value", [0, -1, 11, "three", 2.5, True, [1]])
def test_top_k_invalid_names_the_value(value):
    status, error, detail = _status(lambda: parse_top_k(value, 10, default=5))
    assert ((status, error) == (422, "invalid_top_k") and repr(value)[:3] in detail) or str(value) in detail


def test_default_top_k_is_capped_by_the_class_count():
    assert parse_top_k(None, 3, default=5) == 3


def test_content_types():
    assert check_content_type("multipart/form-data; boundary=abc") == "multipart/form-data"
    assert check_content_type("Application/JSON") == "application/json"
    assert check_content_type("image/png") == "image/png"
    status, _, detail = _status(lambda: check_content_type("text/plain"))
    assert status == 415 and "'text/plain'" in detail
    assert _status(lambda: check_content_type(None))[0] == 415


def test_body_limits():
    check_declared_length(None, 10)
    check_declared_length("10", 10)
    assert _status(lambda: check_declared_length("11", 10))[:2] == (413, "payload_too_large")
    assert _status(lambda: check_declared_length("ten", 10))[0] == 400

    async def chunks(sizes):
        for n in sizes:
            yield b"x" * n

    assert asyncio.run(read_limited(chunks([4, 6]), 10)) == b"x" * 10
    with pytest.raises(RequestError, match="413"):
        asyncio.run(read_limited(chunks([4, 4, 4]), 10))


def test_base64_and_json_bodies():
    raw = b"\x89PNG fake"
    encoded = base64.b64encode(raw).decode()
    assert decode_base64_image(encoded, 100) == raw
    assert decode_base64_image("data:image/png;base64," + encoded, 100) == raw
    assert decode_base64_image(encoded[:4] + "\n" + encoded[4:], 100) == raw
    assert _status(lambda: decode_base64_image("ab*cd", 100))[:2] == (400, "bad_base64")
    assert _status(lambda: decode_base64_image(12, 100))[:2] == (400, "bad_base64")
    assert _status(lambda: decode_base64_image("", 100))[:2] == (400, "empty_image")
    assert _status(lambda: decode_base64_image(encoded, 3))[0] == 413
    assert parse_json_body(b'{"image_base64": "%s", "top_k": 2}' % encoded.encode(), 100) == (raw, 2)
    assert _status(lambda: parse_json_body(b"[1]", 100))[:2] == (400, "bad_json")
    assert _status(lambda: parse_json_body(b"{", 100))[:2] == (400, "bad_json")
    assert "unknown keys ['image']" in _status(lambda: parse_json_body(b'{"image": "x"}', 100))[2]
    assert _status(lambda: parse_json_body(b'{"top_k": 1}', 100))[:2] == (400, "missing_image")


def test_app_args_are_typed_and_names_are_serve_safe():
    args = AppArgs.model_validate({"artifact": "runs/x/ensemble", "cascade_threshold": "0.9", "num_replicas": 2})
    assert args.cascade_threshold == 0.9 and args.api_key_env == "POLYCLIP_API_KEY"
    with pytest.raises(ValueError, match="cascade_thresold"):
        AppArgs.model_validate({"artifact": "a", "cascade_thresold": 0.9})
    with pytest.raises(ValueError, match="artifact"):
        AppArgs.model_validate({})
    assert deployment_name("efficientnet_lite:0") == "Encoder_efficientnet_lite_0"
    assert deployment_name("checkpoint:/tmp/x@64") == "Encoder_checkpoint_tmp_x_64"


@pytest.mark.parametrize("value", ["9" * 5000, "+-3", "\u0663", "1e3", float("nan"), float("inf"), 1e300, -0.0, {}])
def test_top_k_edge_cases_are_422_with_a_short_detail(value):
    status, error, detail = _status(lambda: parse_top_k(value, 10, default=5))
    assert (status, error) == (422, "invalid_top_k") and len(detail) < 160


@pytest.mark.parametrize("body,error", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"image_base64": "aGVsbG8=", "top_k": NaN}', "NaN is not valid JSON"),
    (b'{"image_base64": "aGVsbG8=", "top_k": Infinity}', "Infinity is not valid JSON"),
    (b'{"\\ud800": 1}', "unknown keys"),
])
def test_json_bodies_that_crashed_the_parser_are_400(body, error):
    status, code, detail = _status(lambda: parse_json_body(body, 10**6))
    assert (status, code) == (400, "bad_json") and error in detail and len(detail) < 300


def test_a_huge_json_integer_is_kept_aside_then_refused_as_top_k():
    image, k = parse_json_body(b'{"image_base64": "aGVsbG8=", "top_k": ' + b"7" * 5000 + b"}", 100)
    assert image == b"hello"
    status, _, detail = _status(lambda: parse_top_k(k, 10, default=5))
    assert status == 422 and "5000-digit number" in detail


def test_lone_surrogate_base64_and_huge_content_length_are_client_errors():
    assert _status(lambda: decode_base64_image("\udfff", 100))[:2] == (400, "bad_base64")
    assert _status(lambda: check_declared_length("9" * 5000, 10))[:2] == (400, "bad_request")
