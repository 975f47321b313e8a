"""Output files are served until their TTL passes, then they 404 and are gone from disk."""

from __future__ import annotations

from pathlib import Path

import requests

from removebg_provider.server.files import FileStore
from support.servers import sample_photo_base64, start_api_server

HOUR = 3600.0


class FakeClock:
    """A clock that only moves when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_output_is_downloadable_before_the_ttl_and_gone_after(tmp_path: Path) -> None:
    clock = FakeClock()
    with start_api_server(tmp_path, clock=clock, ttl_hours=24) as server:
        body = {"records": [{"_base64": sample_photo_base64()}]}
        record = requests.post(
            f"{server.base_url}/removebg/fast/removebg", json=body, headers=server.auth_headers(), timeout=30
        ).json()["records"][0]
        url = record["_output_url"]
        on_disk = server.storage_dir / url.rsplit("/", 1)[1]

        clock.advance(23.9 * HOUR)
        before_expiry = requests.get(url, timeout=10)
        clock.advance(0.2 * HOUR)
        after_expiry = requests.get(url, timeout=10)

    assert before_expiry.status_code == 200
    assert before_expiry.headers["content-type"] == "image/png"
    assert after_expiry.status_code == 404
    assert after_expiry.json()["status"]["code"] == 404
    assert not on_disk.exists()


def test_head_and_range_requests_work_for_downloaders(tmp_path: Path) -> None:
    with start_api_server(tmp_path) as server:
        body = {"records": [{"_base64": sample_photo_base64()}]}
        url = requests.post(
            f"{server.base_url}/removebg/fast/removebg", json=body, headers=server.auth_headers(), timeout=30
        ).json()["records"][0]["_output_url"]
        head = requests.head(url, timeout=10)
        first_bytes = requests.get(url, headers={"Range": "bytes=0-7"}, timeout=10)

    assert head.status_code == 200
    assert int(head.headers["content-length"]) > 0
    assert first_bytes.status_code == 206
    assert first_bytes.content == b"\x89PNG\r\n\x1a\n"


def test_unknown_and_path_traversal_names_get_404(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("do not serve")
    with start_api_server(tmp_path, storage_dir=tmp_path / "files") as server:
        unknown = requests.get(f"{server.base_url}/files/{'0' * 32}.png", timeout=10)
        traversal = requests.get(f"{server.base_url}/files/..%2Fsecret.txt", timeout=10)

    assert unknown.status_code == 404
    assert traversal.status_code == 404


def test_sweep_deletes_only_expired_files(tmp_path: Path) -> None:
    clock = FakeClock()
    store = FileStore(tmp_path, ttl_seconds=HOUR, clock=clock)
    old = store.save(b"old", "png")
    clock.advance(0.5 * HOUR)
    new = store.save(b"new", "jpg")
    clock.advance(0.6 * HOUR)

    removed = store.sweep()

    assert removed == 1
    assert not (tmp_path / old).exists()
    assert (tmp_path / new).read_bytes() == b"new"


def test_expiry_survives_a_restart_because_it_is_kept_on_disk(tmp_path: Path) -> None:
    clock = FakeClock()
    name = FileStore(tmp_path, ttl_seconds=HOUR, clock=clock).save(b"data", "webp")
    clock.advance(2 * HOUR)

    reopened = FileStore(tmp_path, ttl_seconds=HOUR, clock=clock)

    assert reopened.open_path(name) is None
    assert not (tmp_path / name).exists()
