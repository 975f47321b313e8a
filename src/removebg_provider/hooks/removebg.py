"""Airflow hook that turns a `removebg` connection into a ready RemoveBgClient."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from removebg_provider.client import DEFAULT_BASE_URL, AccountStatus, RemoveBgClient
from removebg_provider.errors import ConfigurationError, RemoveBgError
from removebg_provider.transport import parse_cert, parse_proxies, parse_verify, proxy_passwords
from removebg_provider.vocabulary import MODES

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class RemoveBgHook(BaseHook):
    """Builds a RemoveBgClient from a `removebg` connection.

    Connection fields: host = API base URL (empty for the public Ximilar API; with or without a
    scheme; schema and port are used when the host does not carry them), password = API token.
    Extras: `mode` (fast|precise), `timeout` (seconds or [connect, read]), `max_retries`,
    `backpressure_deadline` (seconds a request may wait out "busy" answers in total),
    `max_records_per_request`, `requests_per_minute`, `concurrency`, `rate_limit_redis_url` (every
    task on every worker then shares the one `requests_per_minute` budget kept in that Redis),
    `proxies` ({"https": "http://proxy:3128"}), `verify` (false, or a CA bundle path on the workers)
    and `cert` (a client certificate file, or [certificate, key] files). Unknown extras are logged.
    Keyword arguments given to the hook (or to `get_conn`) are passed to RemoveBgClient and win over
    the connection: a pipeline task resolves its settings against `connection_settings()` and passes
    the result.
    """

    conn_name_attr = "removebg_conn_id"
    default_conn_name = "removebg_default"
    conn_type = "removebg"
    hook_name = "Ximilar Remove Background"

    def __init__(self, removebg_conn_id: str = default_conn_name, **client_overrides: Any) -> None:
        super().__init__()
        self.removebg_conn_id = removebg_conn_id
        self.client_overrides = client_overrides

    def connection_settings(self) -> dict[str, Any]:
        """The client settings the connection's extras give, validated (unset extras are left out)."""
        return self._invalid_connection_is_configuration_error(
            lambda: _client_settings(self.get_connection(self.removebg_conn_id).extra_dejson)
        )

    def get_conn(self, **overrides: Any) -> RemoveBgClient:
        """Return a new client for the connection; close it (or use it as a context manager) when done.

        `overrides` (and the hook's own keyword arguments) win over the connection's extras.
        """
        conn = self.get_connection(self.removebg_conn_id)
        token = conn.password or None
        if token is not None:
            mask_secret(token)

        def build() -> RemoveBgClient:
            settings: dict[str, Any] = {
                "base_url": _base_url(conn.host, conn.schema, conn.port),
                "token": token,
                **_client_settings(conn.extra_dejson),
                **self.client_overrides,
                **overrides,
            }
            redis_password = urlsplit(settings.get("rate_limit_redis_url") or "").password
            for secret in [redis_password, *proxy_passwords(settings.get("proxies") or {})]:
                if secret:
                    mask_secret(secret)
            return RemoveBgClient(**settings)

        return self._invalid_connection_is_configuration_error(build)

    def _invalid_connection_is_configuration_error(self, make: Callable[[], _T]) -> _T:
        try:
            return make()
        except ValueError as exc:
            raise ConfigurationError(
                f"Connection {self.removebg_conn_id!r} is invalid: {exc}. Fix it in Airflow's connections."
            ) from exc

    def test_connection(self) -> tuple[bool, str]:
        """The Test button: reachable, token accepted, service activated, credits left; spends no credits."""
        try:
            with self.get_conn() as client:
                ok, message = client.check_connection()
                if not ok:
                    return ok, message
                account = client.account_status()
        except RemoveBgError as exc:
            return False, str(exc)
        return _with_account(message, account)


def _with_account(message: str, account: AccountStatus) -> tuple[bool, str]:
    """The connection test's verdict once the account endpoints have answered."""
    if not account.token_accepted:
        return False, f"{message}, but the account endpoints refused it ({'; '.join(account.notes)})"
    if account.service_active is False:
        return False, f"{message}, but {'; '.join(account.notes)}"
    found = []
    if account.service_active:
        found.append("the Remove Background service is activated")
    if account.credits_left is not None:
        found.append(f"{account.credits_left:g} credits left")
    found += account.notes
    return True, f"{message}; {'; '.join(found)}"


def _base_url(host: str | None, schema: str | None, port: int | None) -> str:
    host = (host or "").strip()
    if not host:
        return DEFAULT_BASE_URL
    if "://" not in host:
        host = f"{schema or 'https'}://{host}"
    parts = urlsplit(host)
    if port and parts.port is None:
        parts = parts._replace(netloc=f"{parts.netloc}:{port}")
    return urlunsplit(parts).rstrip("/")


def _client_settings(extras: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(extras) - set(CONNECTION_EXTRAS))
    if unknown:
        log.warning("Ignoring unknown removebg connection extras: %s", ", ".join(unknown))
    settings = {}
    for name, parse in CONNECTION_EXTRAS.items():
        value = extras.get(name)
        if value is None or value == "":
            continue
        try:
            settings[name] = parse(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"extra {name!r}={value!r}: {exc}") from exc
    return settings


def _mode(value: Any) -> str:
    if value not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return str(value)


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def _timeout(value: Any) -> float | tuple[float, float]:
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ValueError("must be seconds or a [connect, read] pair of seconds")
        return (_number(value[0]), _number(value[1]))
    return _number(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value.strip()


def _integer(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be an integer >= {minimum}")
        number = int(value)
        if number < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return number

    return parse


CONNECTION_EXTRAS: dict[str, Callable[[Any], Any]] = {
    "mode": _mode,
    "timeout": _timeout,
    "max_retries": _integer(0),
    "backpressure_deadline": _number,
    "max_records_per_request": _integer(1),
    "requests_per_minute": _number,
    "concurrency": _integer(1),
    "rate_limit_redis_url": _text,
    "proxies": parse_proxies,
    "verify": parse_verify,
    "cert": parse_cert,
}
