"""Object naming, verification and local atomic writes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from removebg_provider.errors import StorageError
from removebg_provider.outputs import looks_like_image, output_uri, safe_key_id
from removebg_provider.storage import Storage, scheme_of


@pytest.mark.parametrize(
    ("record_id", "expected"),
    [
        ("sku-123", "sku-123"),
        ("../../etc/passwd", "etc_passwd"),
        ("a/b\\c", "a_b_c"),
        ("bad\x00id\nwith\tcontrol", "bad_id_with_control"),
        ("..", "_"),
        ("shoe..v2", "shoe_v2"),
    ],
)
def test_ids_are_made_safe_for_one_key_segment(record_id: str, expected: str) -> None:
    assert safe_key_id(record_id) == expected


@pytest.mark.parametrize("pair", [("赤いシャツ", "青いシャツ"), ("café", "cafè")])
def test_ids_with_other_than_ascii_characters_keep_distinct_keys(pair: tuple[str, str]) -> None:
    first, second = (safe_key_id(record_id) for record_id in pair)

    assert first != second
    assert first.isascii()
    assert "/" not in first


def test_the_same_text_in_another_unicode_form_is_the_same_key() -> None:
    assert safe_key_id("cafe\u0301") == safe_key_id("caf\u00e9")


def test_long_ids_are_shortened_with_a_hash_that_keeps_them_distinct() -> None:
    first, second = safe_key_id("x" * 300 + "1"), safe_key_id("x" * 300 + "2")

    assert len(first) <= 120
    assert first != second


def test_default_keys_follow_the_documented_names() -> None:
    template = "{id}{suffix}.{ext}"

    assert output_uri("s3://b/out/", "sku1", "cutout", "png", template) == "s3://b/out/sku1.png"
    assert output_uri("s3://b/out", "sku1", "mask", "jpg", template) == "s3://b/out/sku1.mask.jpg"
    assert output_uri("s3://b/out", "sku1", "whitebg", "jpg", template) == "s3://b/out/sku1.whitebg.jpg"


def test_a_template_can_group_outputs_by_kind() -> None:
    assert output_uri("/o", "a", "mask", "jpg", "{kind}/{id}.{ext}") == "/o/mask/a.jpg"


def test_a_template_that_escapes_the_prefix_is_refused() -> None:
    with pytest.raises(StorageError, match="unsafe key"):
        output_uri("/o", "a", "cutout", "png", "../{id}.{ext}")


@pytest.mark.parametrize(
    ("data", "ext", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n....", "png", True),
        (b"\xff\xd8\xff\xe0....", "jpg", True),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp", True),
        (b"<html>expired</html>", "png", False),
        (b"\x89PNG\r\n\x1a\n....", "jpg", False),
        (b"", "png", False),
    ],
)
def test_copies_are_verified_by_their_signature(data: bytes, ext: str, expected: bool) -> None:
    assert looks_like_image(data, ext) is expected


@pytest.mark.parametrize(
    ("uri", "scheme"),
    [
        ("/tmp/a", "file"),
        ("file:///tmp/a", "file"),
        ("relative/a", "file"),
        ("S3://b/k", "s3"),
        ("gs://b/k", "gs"),
    ],
)
def test_scheme_of_treats_paths_as_files(uri: str, scheme: str) -> None:
    assert scheme_of(uri) == scheme


def test_write_bytes_creates_folders_and_exists_sees_the_object(tmp_path: Path) -> None:
    storage = Storage()
    target = tmp_path / "deep" / "er" / "a.png"

    storage.write_bytes(str(target), b"data")

    assert storage.exists(str(target))
    assert not storage.exists(str(tmp_path / "other.png"))
    assert storage.read_bytes(f"file://{target}") == b"data"


def test_a_path_under_the_home_folder_is_the_same_object_however_it_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    storage = Storage()

    storage.write_bytes("~/photos/a.jpg", b"jpeg bytes")

    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"jpeg bytes"
    assert storage.read_bytes(str(tmp_path / "photos" / "a.jpg")) == b"jpeg bytes"
    assert storage.read_bytes("~/photos/a.jpg") == b"jpeg bytes"
    assert storage.exists("~/photos/a.jpg")


def test_reading_past_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 11)

    with pytest.raises(StorageError, match="larger than the 10-byte limit"):
        Storage().read_bytes(str(path), limit=10)


def test_list_prefix_lists_visible_files_only(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text("1")
    (tmp_path / "a.jsonl").write_text("1")
    (tmp_path / ".a.jsonl.tmp").write_text("partial")
    (tmp_path / "sub").mkdir()

    assert Storage().list_prefix(str(tmp_path)) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_a_local_write_reaches_the_disk_before_its_name_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut cannot be staged in a test: the system calls are observed instead, and still made.
    calls: list[str] = []
    fsync, replace = os.fsync, os.replace

    def observed_fsync(handle: int) -> None:
        calls.append("fsync folder" if stat.S_ISDIR(os.fstat(handle).st_mode) else "fsync file")
        fsync(handle)

    def observed_replace(source: str, destination: str) -> None:
        calls.append("rename")
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    monkeypatch.setattr(os, "replace", observed_replace)

    Storage().write_bytes(str(tmp_path / "ckpt-1.jsonl"), b'{"billed": 0}\n')

    assert calls == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "ckpt-1.jsonl").read_bytes() == b'{"billed": 0}\n'


_FIRST_MISSES_AT_ONCE = """
import sys, threading
from removebg_provider.errors import StorageError
from removebg_provider.storage import Storage

storage, barrier, outcomes = Storage(), threading.Barrier(16), []

def read_missing(n):
    barrier.wait()
    try:
        storage.read_bytes(f"{sys.argv[1]}/missing-{n}.json")
    except StorageError:
        outcomes.append("StorageError")
    except Exception as exc:
        outcomes.append(repr(exc))

threads = [threading.Thread(target=read_missing, args=(n,)) for n in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(sorted(set(outcomes)))
"""


def test_the_first_failed_reads_of_a_process_in_many_threads_at_once_each_raise_storage_error(
    tmp_path: Path,
) -> None:
    """In a fresh interpreter: the SDKs' errors are imported at the first failure, by all threads."""
    for _ in range(3):
        found = subprocess.run(
            [sys.executable, "-c", _FIRST_MISSES_AT_ONCE, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

        assert found.stdout.strip() == "['StorageError']"
