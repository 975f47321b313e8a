"""Model downloads: verified, resumed after a cut, refused when corrupt, explained when offline.

Every download goes to a real HTTP server on 127.0.0.1 (tests/file_server.py) serving a small
generated ONNX model; nothing is fetched from the internet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import socket
from pathlib import Path

import pytest

from removebg_provider.cli import main
from removebg_provider.engines import get_engine
from removebg_provider.engines.model_store import download, pull
from removebg_provider.engines.presets import PRESETS, ModelPreset
from removebg_provider.errors import RemoveBgError
from support.file_server import serve_files
from support.onnx_models import padded_model_bytes

MODEL_FLOATS = 100_000  # about 400 kB: several 64 kB reads


@pytest.fixture
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return padded_model_bytes(tmp_path_factory.mktemp("source") / "generated.onnx", MODEL_FLOATS)


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens on it once the socket is closed


def test_a_download_whose_checksum_matches_takes_its_final_name(tmp_path: Path, model_bytes: bytes) -> None:
    target = tmp_path / "models" / "u2net.onnx"
    target.parent.mkdir()
    with serve_files({"u2net.onnx": model_bytes}) as server:
        path = download(f"{server.base_url}/u2net.onnx", md5(model_bytes), target)

    assert path == target
    assert target.read_bytes() == model_bytes
    assert not target.with_name("u2net.onnx.part").exists()


def test_a_sha256_checksum_is_verified_too(tmp_path: Path, model_bytes: bytes) -> None:
    checksum = "sha256:" + hashlib.sha256(model_bytes).hexdigest()
    with serve_files({"m.onnx": model_bytes}) as server:
        download(f"{server.base_url}/m.onnx", checksum, tmp_path / "m.onnx")

    assert (tmp_path / "m.onnx").read_bytes() == model_bytes


def test_a_download_cut_mid_body_resumes_where_it_stopped(tmp_path: Path, model_bytes: bytes) -> None:
    target = tmp_path / "u2net.onnx"
    with serve_files({"u2net.onnx": model_bytes}, cut_after=200_000) as server:
        download(f"{server.base_url}/u2net.onnx", md5(model_bytes), target)

    assert target.read_bytes() == model_bytes
    assert len(server.ranges) == 2
    assert server.ranges[0] is None
    resumed_from = int(str(server.ranges[1]).removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 200_000  # the reads that arrived whole before the cut are kept


def test_a_part_left_by_an_interrupted_pull_is_resumed_by_the_next(
    tmp_path: Path, model_bytes: bytes
) -> None:
    target = tmp_path / "u2net.onnx"
    target.with_name("u2net.onnx.part").write_bytes(model_bytes[:150_000])
    with serve_files({"u2net.onnx": model_bytes}) as server:
        download(f"{server.base_url}/u2net.onnx", md5(model_bytes), target)

    assert server.ranges == ["bytes=150000-"]
    assert target.read_bytes() == model_bytes


def test_a_server_ignoring_range_makes_the_download_start_over(tmp_path: Path, model_bytes: bytes) -> None:
    target = tmp_path / "u2net.onnx"
    target.with_name("u2net.onnx.part").write_bytes(b"stale bytes of another file")
    with serve_files({"u2net.onnx": model_bytes}, honour_range=False) as server:
        download(f"{server.base_url}/u2net.onnx", md5(model_bytes), target)

    assert target.read_bytes() == model_bytes


def test_a_complete_part_is_verified_without_downloading_it_again(tmp_path: Path, model_bytes: bytes) -> None:
    target = tmp_path / "u2net.onnx"
    target.with_name("u2net.onnx.part").write_bytes(model_bytes)
    with serve_files({"u2net.onnx": model_bytes}) as server:
        download(f"{server.base_url}/u2net.onnx", md5(model_bytes), target)

    assert server.ranges == [f"bytes={len(model_bytes)}-"]  # answered 416: nothing more to send
    assert target.read_bytes() == model_bytes


def test_a_file_whose_checksum_differs_is_refused_and_deleted(tmp_path: Path, model_bytes: bytes) -> None:
    target = tmp_path / "u2net.onnx"
    corrupt = model_bytes[:-1] + bytes([model_bytes[-1] ^ 0xFF])
    with (
        serve_files({"u2net.onnx": corrupt}) as server,
        pytest.raises(
            RemoveBgError, match=r"has md5 [0-9a-f]{32}, not [0-9a-f]{32}; it was deleted"
        ) as error,
    ):
        download(f"{server.base_url}/u2net.onnx", md5(model_bytes), target)

    assert f"{server.base_url}/u2net.onnx" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_the_error_names_the_url_and_where_to_place_the_file(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/u2net.onnx"
    target = tmp_path / "u2net.onnx"

    with pytest.raises(RemoveBgError) as error:
        download(url, "md5:60024c5c889badc19c04ad937298a77b", target)

    message = str(error.value)
    assert "\n" not in message
    assert f"cannot download {url} (Connection refused)" in message
    assert f"place it at {target} (md5:60024c5c889badc19c04ad937298a77b)" in message
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_on_the_server_is_reported_with_its_status(tmp_path: Path) -> None:
    with serve_files({}) as server, pytest.raises(RemoveBgError, match=r"/u2net\.onnx: HTTP 404"):
        download(f"{server.base_url}/u2net.onnx", "md5:00", tmp_path / "u2net.onnx")


def test_progress_reports_bytes_done_and_the_total(tmp_path: Path, model_bytes: bytes) -> None:
    seen: list[tuple[int, int | None]] = []
    with serve_files({"m.onnx": model_bytes}) as server:
        download(
            f"{server.base_url}/m.onnx", md5(model_bytes), tmp_path / "m.onnx", lambda *p: seen.append(p)
        )

    assert seen[-1] == (len(model_bytes), len(model_bytes))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(seen) > 1


def test_pull_fetches_a_named_model_from_a_mirror_under_its_public_file_name(
    tmp_path: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real table's checksums belong to the real models, which a test cannot download: this
    # entry is u2netp's with the generated model's checksum.
    monkeypatch.setitem(PRESETS, "u2netp", _with_checksum("u2netp", md5(model_bytes)))
    home = tmp_path / "cache"
    with serve_files({"u2netp.onnx": model_bytes}) as server:
        path = pull("u2netp", home, mirror=server.base_url)

    assert path == home / "u2netp.onnx"
    assert path.read_bytes() == model_bytes
    assert get_engine("onnx", "u2netp", model_home=home).name == "onnx"


def test_pull_verifies_a_file_placed_by_hand_without_downloading(
    tmp_path: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PRESETS, "u2netp", _with_checksum("u2netp", md5(model_bytes)))
    (tmp_path / "u2netp.onnx").write_bytes(model_bytes)
    with serve_files({}) as server:
        assert pull("u2netp", tmp_path, mirror=server.base_url) == tmp_path / "u2netp.onnx"

    assert server.ranges == []


def test_pull_refuses_a_file_placed_by_hand_whose_checksum_differs(tmp_path: Path) -> None:
    (tmp_path / "u2netp.onnx").write_bytes(b"not the model")

    with pytest.raises(RemoveBgError, match=r"u2netp\.onnx is already there but its md5 .*delete it"):
        pull("u2netp", tmp_path)


def test_pull_of_a_model_without_public_download_says_to_pass_a_path(tmp_path: Path) -> None:
    with pytest.raises(RemoveBgError, match=r"'ben' has no public download.*--model PATH --model-preset ben"):
        pull("ben", tmp_path)


def test_cli_pull_refuses_a_corrupt_download_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    home = tmp_path / "cache"
    with serve_files({"u2netp.onnx": b"\0" * 3 * 1024 * 1024}) as server:
        code = main(["models", "pull", "u2netp", "--model-home", str(home), "--mirror", server.base_url])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("removebg models pull: error: the file downloaded from ")
    assert "not 8e83ca70e441ab06c318d82300c84806; it was deleted" in err
    assert list(home.iterdir()) == []
    # Not on a terminal, progress comes as log lines: done/total, rate, ETA.
    assert "u2netp: 3.0/3.0 MiB" in caplog.text
    assert "MiB/s, ETA" in caplog.text


def test_cli_pull_offline_exits_2_naming_the_url_and_the_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("REMOVEBG_MODEL_MIRROR", mirror)

    code = main(["models", "pull", "isnet-general-use", "--model-home", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert f"cannot download {mirror}/isnet-general-use.onnx (Connection refused)" in err
    assert f"place it at {tmp_path / 'isnet-general-use.onnx'}" in err


def _with_checksum(name: str, checksum: str) -> ModelPreset:
    return dataclasses.replace(PRESETS[name], checksum=checksum)
