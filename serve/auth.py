"""Where the service's API key comes from, and the rule that auth fails closed.

The key never travels through the Serve config (``runtime_env`` is shown to anyone who
can read the deployment details). A replica reads it from its own environment:

* ``$<api_key_env>`` holds the key itself (``POLYCLIP_API_KEY``), or
* ``$<api_key_env>_FILE`` names a file holding it (``POLYCLIP_API_KEY_FILE``, e.g. a
  mounted Kubernetes Secret), or
* the ``api_key_file`` argument names such a file (the path is not secret).

Surrounding whitespace is stripped (a Secret file usually ends with a newline), and an
empty or unreadable key file is an error rather than "no auth". Serving without a key is
allowed only on a loopback address, or when ``allow_unauthenticated`` is set explicitly.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

#: Suffix of the environment variable that names a key file.
FILE_SUFFIX = "_FILE"


class AuthConfigError(ValueError):
    """The key cannot be read, or serving would be open on a network address."""


def load_api_key(api_key_env: str, api_key_file: str | None = None,
                 environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer key of this replica, stripped of surrounding whitespace, or ``None``.

    Args:
        api_key_env: Variable holding the key; ``<api_key_env>_FILE`` may name a file instead.
        api_key_file: A key file named in the app's arguments (used when neither variable is set).
        environ: The environment (``os.environ`` by default).

    Raises:
        AuthConfigError: A variable or file is set but holds only whitespace, or the file
            cannot be read; both variables are set at once.
    """
    env = os.environ if environ is None else environ
    value = env.get(api_key_env)
    file_var = api_key_env + FILE_SUFFIX
    file = env.get(file_var)
    if value is not None and file:
        raise AuthConfigError(f"both {api_key_env} and {file_var} are set; set one")
    if value is not None:
        key = value.strip()
        if not key:
            raise AuthConfigError(f"{api_key_env} is set but empty (or only whitespace)")
        return key
    path = file or api_key_file
    if not path:
        return None
    source = f"{file_var}={path}" if file else f"api_key_file={path}"
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read the API key file ({source}): {type(exc).__name__}: {exc}") from None
    if not key:
        raise AuthConfigError(f"the API key file ({source}) is empty")
    return key


def is_loopback(host: str | None) -> bool:
    """Whether an HTTP bind address is reachable from this machine only.

    ``localhost`` and loopback IPs are; ``0.0.0.0``, ``::``, any other address or name,
    and an unknown host (``None``) are not.
    """
    if host is None:
        return False
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_auth_config(key: str | None, host: str | None, allow_unauthenticated: bool, api_key_env: str) -> None:
    """Refuse to serve without a key on a non-loopback host, unless explicitly allowed.

    Raises:
        AuthConfigError: Naming the host and how to provide a key.
    """
    if key is not None or allow_unauthenticated or is_loopback(host):
        return
    raise AuthConfigError(
        f"refusing to serve on host {host!r} without an API key: set {api_key_env} or "
        f"{api_key_env}{FILE_SUFFIX} (a mounted Secret) in the replicas' environment, or api_key_file, "
        "or set allow_unauthenticated: true to serve openly on purpose")
