"""A `_url` fetch ends at its total deadline however slowly the host drips, and embedded IPv4 is judged."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from removebg_provider.guarded_fetch import is_public_address
from support.servers import LocalApiServer, start_api_server

FETCH_TIMEOUT_SECONDS = 3
DRIP_INTERVAL_SECONDS = 2.0
WAIT_SECONDS = 60.0


@dataclass
class DripHost:
    """A raw TCP server on 127.0.0.1 that answers every connection one byte every 2 s, for ever."""

    url: str
    connections: int = 0
    closed_by_peer: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


def _drip(connection: socket.socket, host: DripHost, at_once: bytes, dripped: bytes) -> None:
    with connection:
        connection.recv(65536)
        try:
            connection.sendall(at_once)
            for byte in dripped:
                if host.stop.wait(DRIP_INTERVAL_SECONDS):
                    return
                connection.sendall(bytes([byte]))
        except OSError:
            host.closed_by_peer.set()


def _serve_drips(listener: socket.socket, host: DripHost, at_once: bytes, dripped: bytes) -> None:
    while not host.stop.is_set():
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        host.connections += 1
        threading.Thread(target=_drip, args=(connection, host, at_once, dripped), daemon=True).start()


@pytest.fixture(params=["headers", "body"])
def drip_host(request: pytest.FixtureRequest) -> Iterator[DripHost]:
    """Drips either its headers after the status line, or a body announced as 100,000 bytes."""
    if request.param == "headers":
        at_once, dripped = b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 10_000
    else:
        at_once, dripped = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"\x89" * 100_000
    listener = socket.create_server(("127.0.0.1", 0))
    host = DripHost(url=f"http://127.0.0.1:{listener.getsockname()[1]}/photo.png")
    thread = threading.Thread(target=_serve_drips, args=(listener, host, at_once, dripped), daemon=True)
    thread.start()
    try:
        yield host
    finally:
        host.stop.set()
        listener.close()


def remove_background(server: LocalApiServer, *records: dict[str, object]) -> list[dict[str, object]]:
    response = requests.post(
        f"{server.base_url}/removebg/fast/removebg",
        json={"records": list(records)},
        headers=server.auth_headers(),
        timeout=WAIT_SECONDS,
    )
    response.raise_for_status()
    result: list[dict[str, object]] = response.json()["records"]
    return result


def status_of(record: dict[str, object]) -> dict[str, object]:
    status = record["_status"]
    assert isinstance(status, dict)
    return status


def test_a_host_that_drips_bytes_is_cut_off_at_the_total_fetch_deadline(
    tmp_path: Path, drip_host: DripHost
) -> None:
    settings: dict[str, Any] = {"allow_private_urls": True, "fetch_timeout_seconds": FETCH_TIMEOUT_SECONDS}
    with start_api_server(tmp_path, **settings) as server:
        [record] = remove_background(server, {"_id": "slow", "_url": drip_host.url})
        billed = server.stats()["records_billed"]

        assert drip_host.closed_by_peer.wait(WAIT_SECONDS), "the server never closed the dripping connection"
    assert status_of(record)["code"] == 408
    assert f"took longer than {FETCH_TIMEOUT_SECONDS} s" in str(status_of(record)["text"])
    assert drip_host.connections == 1
    assert billed == 0


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254, the cloud metadata service
        "64:ff9b:1::a00:1",  # local-use NAT64 prefix
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "::127.0.0.1",  # IPv4-compatible loopback
        "::10.0.0.1",  # IPv4-compatible private
        "::169.254.169.254",  # IPv4-compatible link-local
        "::8.8.8.8",  # IPv4-compatible forms are deprecated and never public
        "::ffff:10.0.0.1",  # IPv4-mapped private
        "::ffff:169.254.169.254",  # IPv4-mapped link-local
        "::ffff:0:7f00:1",  # IPv4-translated loopback
    ],
)
def test_ipv6_forms_of_private_loopback_and_link_local_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111", "8.8.8.8"],
)
def test_ipv6_forms_of_public_addresses_stay_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[::127.0.0.1]"])
def test_a_url_at_a_nat64_6to4_or_ipv4_compatible_loopback_is_refused_before_connecting(
    api_server: LocalApiServer, host: str
) -> None:
    [record] = remove_background(api_server, {"_url": f"http://{host}:9/photo.png"})

    assert status_of(record)["code"] == 403
    assert "not a public address" in str(status_of(record)["text"])
