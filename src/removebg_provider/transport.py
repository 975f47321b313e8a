"""The API client's proxy and TLS settings (`proxies`, `verify`, `cert`): what they accept, for requests.

They are passed with every request rather than set on the session: requests lets the environment
(`REQUESTS_CA_BUNDLE`, `HTTPS_PROXY`) override a session's own `verify` and `proxies`, and a setting
given explicitly should win over the environment. Settings left unset leave requests' defaults and
the environment in force.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from removebg_provider.errors import ConfigurationError

_TRUE, _FALSE = "true", "false"


def request_options(
    proxies: Mapping[str, str] | None = None,
    verify: bool | str = True,
    cert: str | tuple[str, str] | list[str] | None = None,
) -> dict[str, Any]:
    """The keyword arguments for `requests.Session.request` that these settings ask for (unset ones left out).

    ConfigurationError names the setting and what it accepts, never a proxy's password.
    """
    options: dict[str, Any] = {}
    try:
        if proxies:
            options["proxies"] = parse_proxies(proxies)
        checked_verify = parse_verify(verify)
        if checked_verify is not True:
            options["verify"] = checked_verify
        if cert:
            options["cert"] = parse_cert(cert)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    return options


def parse_proxies(value: Any) -> dict[str, str]:
    """A mapping of scheme (or `scheme://host`, or `all`) to proxy URL, as requests takes it."""
    if not isinstance(value, Mapping):
        raise ValueError('proxies must map a scheme to a proxy URL, e.g. {"https": "http://proxy:3128"}')
    proxies = {}
    for scheme, url in value.items():
        if not isinstance(scheme, str) or not scheme or not isinstance(url, str):
            raise ValueError(f"proxies must map scheme names to URL strings, got key {scheme!r}")
        parts = urlsplit(url.strip())
        if not parts.scheme or not parts.hostname:
            raise ValueError(
                f"proxies[{scheme!r}] must be a URL such as http://proxy:3128, got {_redacted(url)!r}"
            )
        proxies[scheme] = url.strip()
    return proxies


def parse_verify(value: Any) -> bool | str:
    """True or False (also as "true"/"false"), or the path of a CA bundle file or directory that exists."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"verify must be true, false or the path of a CA bundle, got {value!r}")
    text = value.strip()
    if text.lower() in (_TRUE, _FALSE):
        return text.lower() == _TRUE
    if not os.path.exists(text):
        raise ValueError(f"verify names a CA bundle that does not exist: {text}")
    return text


def parse_cert(value: Any) -> str | tuple[str, str]:
    """A client certificate: one file holding certificate and key, or a [certificate, key] pair of files."""
    paths = [value] if isinstance(value, str) else value
    if (
        not isinstance(paths, list | tuple)
        or not 1 <= len(paths) <= 2
        or not all(isinstance(p, str) for p in paths)
    ):
        raise ValueError(f"cert must be a file path or a [certificate, key] pair of paths, got {value!r}")
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"cert names a file that does not exist: {path}")
    return paths[0] if len(paths) == 1 else (paths[0], paths[1])


def proxy_passwords(proxies: Mapping[str, str]) -> list[str]:
    """The passwords inside proxy URLs, for a caller that masks secrets in its logs."""
    return [password for url in proxies.values() if (password := urlsplit(url).password)]


def _redacted(url: str) -> str:
    """`url` with the password of its user info replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
