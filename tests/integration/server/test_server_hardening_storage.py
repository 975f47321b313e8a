"""Outputs live in a folder only the server can write; it serves no symlink and sweeps only its own files."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests

from removebg_provider.server.files import FileStore
from support.serve_process import run_serve_until_exit, serve_process
from support.servers import sample_photo_base64, start_api_server

WAIT_SECONDS = 120.0
OWN_NAME = f"{'ab' * 16}.png"
LONG_AGO = 1_000_000_000.0  # 2001: expired under any TTL


def folder_owned_by_someone_else(tmp_path: Path) -> Path:
    """A folder this user does not own: made and given away when running as root, else the root folder."""
    if os.geteuid() != 0:
        return Path("/")
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    return folder


def test_without_a_storage_folder_each_store_makes_a_fresh_private_one() -> None:
    first, second = FileStore(None, ttl_seconds=60), FileStore(None, ttl_seconds=60)
    try:
        folders = [Path(first.directory), Path(second.directory)]
        modes = [stat.S_IMODE(folder.stat().st_mode) for folder in folders]
        owners = [folder.stat().st_uid for folder in folders]
    finally:
        first.close()
        second.close()

    assert folders[0] != folders[1]
    assert modes == [0o700, 0o700]
    assert owners == [os.geteuid(), os.geteuid()]
    assert not folders[0].exists()


def test_serve_without_storage_writes_outputs_to_a_private_folder_it_removes_on_exit() -> None:
    with serve_process() as server:
        logged = server.wait_for_log(r"outputs in (\S+) for")
        assert logged is not None
        folder = Path(logged.group(1))
        body = {"records": [{"_base64": sample_photo_base64()}]}
        record = requests.post(
            f"{server.base_url}/removebg/fast/removebg",
            json=body,
            headers=server.headers,
            timeout=WAIT_SECONDS,
        ).json()["records"][0]
        written = folder / record["_output_url"].rsplit("/", 1)[1]
        mode, owner, output_exists = (
            stat.S_IMODE(folder.stat().st_mode),
            folder.stat().st_uid,
            written.is_file(),
        )

    assert mode == 0o700
    assert owner == os.geteuid()
    assert output_exists
    assert not folder.exists()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_storage_folder_others_may_write_to_is_refused_at_start(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)

    done = refused_start("--storage", str(folder))

    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert f"refusing the storage folder {folder}: others may write to it" in line


def test_a_storage_folder_another_user_owns_is_refused_at_start(tmp_path: Path) -> None:
    folder = folder_owned_by_someone_else(tmp_path)

    done = refused_start("--storage", str(folder))

    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert f"refusing the storage folder {folder}: it belongs to uid" in line


def test_a_missing_storage_folder_is_created_private(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "outputs"

    FileStore(folder, ttl_seconds=60)

    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_symlink_planted_in_the_storage_folder_is_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "root-only.txt"
    secret.write_text("the root password")
    folder = tmp_path / "files"
    with start_api_server(tmp_path, storage_dir=folder) as server:
        (folder / OWN_NAME).symlink_to(secret)
        served = requests.get(f"{server.base_url}/files/{OWN_NAME}", timeout=30)

    assert served.status_code == 404
    assert "root password" not in served.text
    assert secret.read_text() == "the root password"


def test_the_ttl_sweep_deletes_only_files_the_server_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir(mode=0o700)
    target = tmp_path / "precious.png"
    target.write_bytes(b"keep me")
    theirs = [
        "notes.txt",
        "upload.part",
        ".upload.part",
        "photo.png.part",
        f"{'cd' * 16}.txt",
        f".{OWN_NAME}.tmp",
    ]
    for name in theirs:
        (folder / name).write_bytes(b"the user's")
    (folder / f"{'ef' * 16}.jpg").symlink_to(target)
    abandoned_partial = folder / f".{OWN_NAME}.part"
    abandoned_partial.write_bytes(b"half an output")
    for path in [*folder.iterdir(), target]:
        os.utime(path, (LONG_AGO, LONG_AGO), follow_symlinks=False)

    # A one-second TTL makes the server sweep every second.
    with start_api_server(tmp_path, storage_dir=folder, ttl_hours=1 / 3600):
        deadline = time.monotonic() + WAIT_SECONDS
        while abandoned_partial.exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    assert not abandoned_partial.exists(), "the sweep never removed the server's own abandoned partial write"
    assert sorted(path.name for path in folder.iterdir()) == sorted([*theirs, f"{'ef' * 16}.jpg"])
    assert target.read_bytes() == b"keep me"


def refused_start(*options: str) -> subprocess.CompletedProcess[str]:
    done = run_serve_until_exit(*options)
    if done is None:
        pytest.fail("removebg serve started instead of refusing the storage folder")
    return done
