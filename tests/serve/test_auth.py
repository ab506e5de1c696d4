"""Where the API key comes from and the fail-closed rule, without Ray."""

import pytest

from serve.auth import AuthConfigError, check_auth_config, is_loopback, load_api_key
from serve.validation import RequestError, check_api_key


def test_key_from_the_environment_is_stripped():
    assert load_api_key("K", environ={"K": "  s3cret\n"}) == "s3cret"
    assert load_api_key("K", environ={}) is None


def test_key_from_a_secret_file_named_by_variable_or_argument(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")  # a Kubernetes Secret file ends with a newline
    assert load_api_key("K", environ={"K_FILE": str(secret)}) == "s3cret"
    assert load_api_key("K", api_key_file=str(secret), environ={}) == "s3cret"
    assert load_api_key("K", api_key_file=str(tmp_path / "unused"), environ={"K": "env"}) == "env"


@pytest.mark.parametrize("environ,file_text,match", [
    ({"K": "  \n"}, None, "K is set but empty"),
    ({"K_FILE": "{file}"}, "\n\n", "is empty"),
    ({"K_FILE": "{missing}"}, None, "cannot read the API key file"),
    ({"K": "a", "K_FILE": "{file}"}, "b", "both K and K_FILE are set"),
])
def test_a_key_source_that_is_set_but_unusable_fails_instead_of_disabling_auth(tmp_path, environ, file_text, match):
    file = tmp_path / "key"
    if file_text is not None:
        file.write_text(file_text)
    env = {k: v.format(file=file, missing=tmp_path / "missing") for k, v in environ.items()}
    with pytest.raises(AuthConfigError, match=match):
        load_api_key("K", environ=env)


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.com", False), ("", False), (None, False),
])
def test_loopback_hosts(host, expected):
    assert is_loopback(host) is expected


def test_no_key_on_a_network_host_is_refused_unless_explicitly_allowed():
    check_auth_config(None, "127.0.0.1", False, "K")  # loopback: development
    check_auth_config("s3cret", "0.0.0.0", False, "K")
    check_auth_config(None, "0.0.0.0", True, "K")  # allow_unauthenticated: on purpose
    with pytest.raises(AuthConfigError, match=r"refusing to serve on host '0\.0\.0\.0' without an API key.*K_FILE"):
        check_auth_config(None, "0.0.0.0", False, "K")
    with pytest.raises(AuthConfigError, match="host None"):  # host unknown: fail closed
        check_auth_config(None, None, False, "K")


def test_tokens_are_compared_after_stripping_both_sides():
    check_api_key("s3cret\n", "Bearer s3cret")
    check_api_key("s3cret", "Bearer   s3cret  ")
    check_api_key("s3cret", "  bearer s3cret")
    for header in ("Bearer", "Bearer    ", "s3cret", "Token s3cret", "Bearer s3cret2", "Bearer \ud800"):
        with pytest.raises(RequestError) as err:
            check_api_key("s3cret", header)
        assert err.value.status == 401 and err.value.headers == {"WWW-Authenticate": "Bearer"}
