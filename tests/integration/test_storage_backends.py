"""Storage against real S3 (moto), GCS (fake-gcs-server) and Azure Blob (Azurite) servers on 127.0.0.1."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from removebg_provider.errors import StorageError
from removebg_provider.storage import Storage
from support.stores import AzuriteBlob, MotoS3, ObjectStore, StoreServer


def test_write_bytes_then_read_bytes_round_trips(object_store: ObjectStore) -> None:
    uri = object_store.uri("folder/photo.png")

    object_store.storage.write_bytes(uri, b"\x89PNG\r\n\x1a\nbytes")

    assert object_store.storage.read_bytes(uri) == b"\x89PNG\r\n\x1a\nbytes"


def test_exists_tells_a_stored_object_from_a_missing_one(object_store: ObjectStore) -> None:
    object_store.storage.write_bytes(object_store.uri("here.txt"), b"x")

    assert object_store.storage.exists(object_store.uri("here.txt")) is True
    assert object_store.storage.exists(object_store.uri("not-here.txt")) is False


def test_reading_a_missing_object_is_a_storage_error_naming_it(object_store: ObjectStore) -> None:
    missing = object_store.uri("photos/gone.jpg")

    with pytest.raises(StorageError, match=r"photos/gone\.jpg"):
        object_store.storage.read_bytes(missing)


def test_read_bytes_refuses_an_object_over_the_limit(object_store: ObjectStore) -> None:
    uri = object_store.uri("big.bin")
    object_store.storage.write_bytes(uri, b"0123456789")

    with pytest.raises(StorageError, match="larger than the 4-byte limit"):
        object_store.storage.read_bytes(uri, limit=4)


def test_list_prefix_lists_only_the_objects_directly_under_the_prefix(object_store: ObjectStore) -> None:
    for key in ("ckpt/a.jsonl", "ckpt/b.jsonl", "ckpt/nested/c.jsonl", "ckpt-other/d.jsonl"):
        object_store.storage.write_bytes(object_store.uri(key), b"{}")

    listed = object_store.storage.list_prefix(object_store.uri("ckpt"))

    assert listed == [object_store.uri("ckpt/a.jsonl"), object_store.uri("ckpt/b.jsonl")]


def test_list_prefix_of_the_bucket_root_lists_its_top_level_objects(object_store: ObjectStore) -> None:
    for key in ("top.txt", "folder/inner.txt"):
        object_store.storage.write_bytes(object_store.uri(key), b"x")

    assert object_store.storage.list_prefix(object_store.uri("")) == [object_store.uri("top.txt")]


def test_list_prefix_of_a_prefix_with_no_objects_is_empty(object_store: ObjectStore) -> None:
    assert object_store.storage.list_prefix(object_store.uri("nothing/here/")) == []


def test_a_small_write_to_s3_is_one_put_not_a_multipart_upload(moto_s3: MotoS3) -> None:
    store = moto_s3.new_store()
    requests_sent: list[str] = []
    try:
        moto_s3.counted_storage(requests_sent).write_bytes(store.uri("sku-1.png"), b"\x89PNG\r\n")

        written = store.storage.read_bytes(store.uri("sku-1.png"))
    finally:
        store.delete_bucket()
    assert written == b"\x89PNG\r\n"
    assert [urlsplit(url).query for url in requests_sent] == [""]


@pytest.mark.parametrize("key", ["/after-a-double-slash.png", "out/hash#1.png", "out/question?1.png"])
def test_a_small_write_lands_where_reads_look_however_its_key_is_spelled(
    object_store: ObjectStore, key: str
) -> None:
    uri = object_store.uri() + key

    object_store.storage.write_bytes(uri, b"small")

    with object_store.storage.open(uri, "rb") as stream:
        assert stream.read() == b"small"
    assert object_store.storage.read_bytes(uri) == b"small"


def test_s3_writes_keep_the_request_arguments_the_transport_parameters_give(moto_s3: MotoS3) -> None:
    store = moto_s3.new_store()
    client = moto_s3.client()
    encrypted = {"S3.Client.create_multipart_upload": {"ServerSideEncryption": "AES256"}}
    storage = Storage(transport_params={"s3": {"client": client, "client_kwargs": encrypted}})
    try:
        storage.write_bytes(store.uri("sku-1.png"), b"\x89PNG\r\n")

        head = client.head_object(Bucket=store.bucket, Key="sku-1.png")
    finally:
        store.delete_bucket()
    assert head["ServerSideEncryption"] == "AES256"


def test_atomic_writer_publishes_the_object_only_when_the_block_succeeds(object_store: ObjectStore) -> None:
    uri = object_store.uri("out/manifest.parquet")

    with object_store.storage.atomic_writer(uri) as stream:
        stream.write(b"complete")

    assert object_store.storage.read_bytes(uri) == b"complete"


def test_atomic_writer_publishes_nothing_when_the_block_fails(object_store: ObjectStore) -> None:
    uri = object_store.uri("out/manifest.parquet")

    with pytest.raises(RuntimeError, match="writer died"):
        _write_then_fail(object_store.storage, uri, b"partial")

    assert object_store.storage.exists(uri) is False
    assert object_store.storage.list_prefix(object_store.uri("out")) == []


def test_a_failed_rewrite_keeps_the_previous_object(object_store: ObjectStore) -> None:
    uri = object_store.uri("out/manifest.parquet")
    object_store.storage.write_bytes(uri, b"version 1")

    with pytest.raises(RuntimeError, match="writer died"):
        _write_then_fail(object_store.storage, uri, b"version 2, half written")

    assert object_store.storage.read_bytes(uri) == b"version 1"


def test_az_and_azure_uris_name_the_same_blob(azurite: AzuriteBlob) -> None:
    store = azurite.new_store()
    try:
        storage = Storage(transport_params={"az": {"client": azurite.client()}})
        storage.write_bytes(f"az://{store.bucket}/in/a.txt", b"same blob")

        assert storage.read_bytes(f"azure://{store.bucket}/in/a.txt") == b"same blob"
        assert storage.list_prefix(f"azure://{store.bucket}/in") == [f"azure://{store.bucket}/in/a.txt"]
    finally:
        store.delete_bucket()


def _write_then_fail(storage: Storage, uri: str, data: bytes) -> None:
    with storage.atomic_writer(uri) as stream:
        stream.write(data)
        raise RuntimeError("writer died")


def test_create_new_writes_only_when_nothing_is_there(object_store: ObjectStore) -> None:
    uri = object_store.uri("claims/k.json")

    first = object_store.storage.create_new(uri, b"first")
    second = object_store.storage.create_new(uri, b"second")

    assert (first, second) == (True, False)
    assert object_store.storage.read_bytes(uri) == b"first"


def test_delete_removes_an_object_and_ignores_a_missing_one(object_store: ObjectStore) -> None:
    uri = object_store.uri("claims/k.json")
    object_store.storage.write_bytes(uri, b"x")

    object_store.storage.delete(uri)
    object_store.storage.delete(uri)

    assert object_store.storage.exists(uri) is False


def test_version_changes_when_an_object_is_written_again_and_is_none_when_missing(
    object_store: ObjectStore,
) -> None:
    uri = object_store.uri("cutouts/a.png")
    object_store.storage.write_bytes(uri, b"one")
    before = object_store.storage.version(uri)

    object_store.storage.write_bytes(uri, b"two")

    assert before is not None
    assert object_store.storage.version(uri) not in (None, before)
    assert object_store.storage.version(object_store.uri("cutouts/missing.png")) is None


def test_fingerprints_tell_changed_content_and_missing_objects(object_store: ObjectStore) -> None:
    uri, missing = object_store.uri("photos/a.jpg"), object_store.uri("photos/gone.jpg")
    object_store.storage.write_bytes(uri, b"first photo")
    before = object_store.storage.fingerprints([uri, missing])

    object_store.storage.write_bytes(uri, b"second photo")

    after = object_store.storage.fingerprints([uri])
    assert before[missing] is None
    assert before[uri] is not None
    assert after[uri] not in (None, before[uri])


def test_fingerprints_of_many_objects_in_one_folder_match_each_object_s_own(
    object_store: ObjectStore,
) -> None:
    uris = [object_store.uri(f"photos/p-{i:02d}.jpg") for i in range(20)]
    for index, uri in enumerate(uris):
        object_store.storage.write_bytes(uri, f"photo {index}".encode())
    object_store.storage.write_bytes(object_store.uri("photos/p-99-not-asked.jpg"), b"other")

    together = object_store.storage.fingerprints(uris)

    assert together == {uri: object_store.storage.fingerprints([uri])[uri] for uri in uris}
    assert len(set(together.values())) == 20


def test_fingerprints_of_many_objects_in_one_folder_cost_one_listing_not_a_request_each(
    object_store: ObjectStore, store_server: StoreServer
) -> None:
    uris = [object_store.uri(f"photos/p-{i:02d}.jpg") for i in range(40)]
    for index, uri in enumerate(uris):
        object_store.storage.write_bytes(uri, f"photo {index}".encode())
    requests_sent: list[str] = []

    found = store_server.counted_storage(requests_sent).fingerprints(uris)

    assert found == object_store.storage.fingerprints(uris)
    assert requests_sent
    assert [url for url in requests_sent if ".jpg" in urlsplit(url).path] == []


def test_versions_of_many_objects_in_one_folder_cost_one_listing_and_match_each_object_s_own(
    object_store: ObjectStore, store_server: StoreServer
) -> None:
    uris = [object_store.uri(f"cutouts/p-{i:02d}.png") for i in range(40)]
    for index, uri in enumerate(uris):
        object_store.storage.write_bytes(uri, f"cutout {index}".encode())
    missing = object_store.uri("cutouts/p-99.png")
    requests_sent: list[str] = []

    found = store_server.counted_storage(requests_sent).versions([*uris, missing])

    assert found == {uri: object_store.storage.version(uri) for uri in uris} | {missing: None}
    assert None not in [found[uri] for uri in uris]
    assert requests_sent
    assert [url for url in requests_sent if ".png" in urlsplit(url).path] == []


def test_a_listing_whose_objects_asked_for_are_spread_thin_over_a_large_folder_stops_after_a_page(
    moto_s3: MotoS3,
) -> None:
    # A bucket of its own, left for the server to drop when it stops: deleting 1,050 objects one by
    # one would take moto longer than the test.
    store = moto_s3.new_store()
    client = moto_s3.client()
    keys = [f"photos/p-{i:05d}.jpg" for i in range(1050)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=store.bucket, Key=key, Body=key.encode()), keys))
    asked = [store.uri(key) for key in keys[::50]]
    requests_sent: list[str] = []

    found = moto_s3.counted_storage(requests_sent).fingerprints(asked)

    listings = [url for url in requests_sent if "list-type" in urlsplit(url).query]
    assert found == {uri: store.storage.fingerprints([uri])[uri] for uri in asked}
    assert None not in found.values()
    # The folder is two pages; the first shows 21 objects among 1,000, the last is asked for alone.
    assert len(listings) == 1


@pytest.mark.parametrize(
    "names",
    [
        [f"photos//p-{i:02d}.jpg" for i in range(20)],
        # Code point order and UTF-16 order disagree past U+FFFF; an unasked name sits between.
        [f"u/\uff01-{i:02d}.jpg" for i in range(18)] + ["u/\U0001f600-asked.jpg", "u/a.jpg"],
    ],
    ids=["double-slash-folder", "unicode-names"],
)
def test_fingerprints_from_a_listing_match_each_object_s_own_however_its_names_are_spelled(
    object_store: ObjectStore, names: list[str]
) -> None:
    uris = [object_store.uri(name) for name in names]
    for index, uri in enumerate(uris):
        object_store.storage.write_bytes(uri, f"photo {index}".encode())
    object_store.storage.write_bytes(object_store.uri("u/\U0001f600-not-asked.jpg"), b"other")

    together = object_store.storage.fingerprints(uris)

    assert None not in together.values()
    assert together == {uri: object_store.storage.fingerprints([uri])[uri] for uri in uris}


def test_azure_images_without_a_client_have_no_fingerprint_and_nothing_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    uris = [f"az://photos/catalog/p-{i:02d}.jpg" for i in range(20)]

    assert Storage().fingerprints(uris) == dict.fromkeys(uris)


def test_a_folder_that_may_not_be_listed_has_its_objects_described_one_by_one(
    moto_s3: MotoS3, caplog: pytest.LogCaptureFixture
) -> None:
    store = moto_s3.new_store()
    try:
        uris = [store.uri(f"photos/p-{i:02d}.jpg") for i in range(20)]
        for index, uri in enumerate(uris):
            store.storage.write_bytes(uri, f"photo {index}".encode())
        expected = store.storage.fingerprints(uris)

        with moto_s3.listing_denied(store.bucket) as client, caplog.at_level(logging.WARNING):
            found = Storage(transport_params={"s3": {"client": client}}).fingerprints(uris)
    finally:
        store.delete_bucket()

    assert found == expected
    assert "its objects are described one by one" in caplog.text


def test_a_local_file_s_fingerprint_is_its_content_wherever_it_lies(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a.jpg", tmp_path / "copy" / "a.jpg", tmp_path / "b.jpg"
    second.parent.mkdir()
    first.write_bytes(b"same photo")
    second.write_bytes(b"same photo")
    other.write_bytes(b"another photo")

    found = Storage().fingerprints([str(first), str(second), str(other)])

    assert found[str(first)] == found[str(second)] != found[str(other)]


@pytest.mark.parametrize("server_fixture", ["moto_s3", "fake_gcs", "azurite"])
def test_many_threads_using_an_object_store_at_once_keep_their_connections(
    server_fixture: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SDKs' default pools of 10 would drop every connection past it, each with a warning."""
    readers = 24
    server: StoreServer = request.getfixturevalue(server_fixture)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    store = server.new_store()
    try:
        uris = [store.uri(f"photos/{n}.jpg") for n in range(readers)]
        for uri in uris:
            store.storage.write_bytes(uri, uri.encode())
        storage = Storage()  # the environment's client, as a user without `storage_options` gets
        together = threading.Barrier(readers, timeout=120)

        def read_together(uri: str) -> tuple[str | None, bytes]:
            together.wait()
            version = storage.version(uri)
            together.wait()
            return version, storage.read_bytes(uri)

        caplog.set_level(logging.WARNING, logger="urllib3")
        with ThreadPoolExecutor(readers) as pool:
            contents = list(pool.map(read_together, uris))
    finally:
        store.delete_bucket()

    assert [content for _, content in contents] == [uri.encode() for uri in uris]
    assert None not in [version for version, _ in contents]
    assert [record.message for record in caplog.records if "pool is full" in record.message] == []


def test_the_azure_client_from_the_connection_string_keeps_the_storage_sdk_s_timeouts(
    azurite: AzuriteBlob,
) -> None:
    """azure-storage-blob gives the transport it builds 20 s to connect and 60 s per read; a transport
    built without them waits azure-core's 300 s on a stalled server. Read from the clients' transports
    (private `_config`): waiting a minute for a stalled server would be a slow test of the same thing."""
    from azure.storage.blob import BlobServiceClient

    from removebg_provider.storage.azure_blob import _azure_client

    sdk_own = BlobServiceClient.from_connection_string(azurite.connection_string)._config.transport
    ours = _azure_client(azurite.connection_string)._config.transport

    assert (ours.connection_config.timeout, ours.connection_config.read_timeout) == (
        sdk_own.connection_config.timeout,
        sdk_own.connection_config.read_timeout,
    )
