"""The backend of Azure Blob Storage (az:// and azure://), through azure-storage-blob."""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any
from urllib.parse import urlparse

from removebg_provider.errors import StorageError
from removebg_provider.storage.base import POOL_CONNECTIONS, Backend, Described, register, unless_changed
from removebg_provider.storage.sdk_errors import missing_errors, short_error, storage_errors
from removebg_provider.storage.uris import bucket_and_folder, bucket_and_key, listed_uri

AZURE_CONNECTION_ENV = "AZURE_STORAGE_CONNECTION_STRING"


@register("az", "azure")
class AzureBackend(Backend):
    """Azure Blob Storage. `az://` is the fsspec/adlfs spelling users know; smart_open calls it `azure://`.

    S3 and GCS SDKs read their environment themselves; smart_open needs an Azure client, made from
    AZURE_STORAGE_CONNECTION_STRING when no client is given.
    """

    lists_fingerprints = True
    # Azurite lists in UTF-16 order, and Azure does not document its own.
    lists_in_code_point_order = False

    def __init__(self, params: Mapping[str, Any]) -> None:
        connection_string = os.environ.get(AZURE_CONNECTION_ENV)
        if "client" not in params and connection_string:
            params = {**params, "client": _azure_client(connection_string)}
        super().__init__(params)

    def open(self, uri: str, mode: str) -> IO[Any]:
        if uri.startswith("az://"):
            uri = "azure" + uri[len("az") :]
        return super().open(uri, mode)

    def list_prefix(self, prefix: str) -> list[str]:
        bucket, key_prefix = bucket_and_folder(prefix)
        container = self._container(prefix)
        names = [blob.name for blob in container.walk_blobs(name_starts_with=key_prefix, delimiter="/")]
        scheme = urlparse(prefix).scheme
        return sorted(f"{scheme}://{bucket}/{name}" for name in names if not name.endswith("/"))

    def fingerprint(self, uri: str, limit: int | None = None) -> str | None:
        properties = self._properties(uri)
        return None if properties is None else _azure_fingerprint(uri, properties)

    def list_described(self, first: str, last: str) -> Iterator[tuple[str, Described]]:
        (bucket, first_key), last_key = bucket_and_key(first), bucket_and_key(last)[1]
        # From the longest prefix the range shares (not every Azure service version knows a start),
        # one level deep: a sub-folder comes as a prefix ending in "/", and is skipped.
        shared = os.path.commonprefix([first_key, last_key])  # noqa: RUF071 (names, not paths)
        for item in self._container(first).walk_blobs(name_starts_with=shared, delimiter="/"):
            if not item.name.endswith("/"):
                uri = f"az://{bucket}/{item.name}"
                yield uri, Described(_azure_fingerprint(uri, item), _azure_version(item))

    def version(self, uri: str) -> str | None:
        properties = self._properties(uri)
        return None if properties is None else _azure_version(properties)

    def create_new(self, uri: str, data: bytes) -> bool:
        from azure.core.exceptions import ResourceExistsError

        upload = self._blob_client(uri).upload_blob
        return unless_changed(uri, "create", lambda: upload(data, overwrite=False), (ResourceExistsError,))

    def delete(self, uri: str) -> None:
        try:
            self._blob_client(uri).delete_blob()
        except missing_errors():
            pass
        except storage_errors() as exc:
            raise StorageError(f"cannot delete {uri}: {short_error(exc)}") from exc

    def read_with_revision(self, uri: str) -> tuple[bytes, str] | None:
        try:
            download = self._blob_client(uri).download_blob()
            return download.readall(), str(download.properties.etag)
        except missing_errors():
            return None
        except storage_errors() as exc:
            raise StorageError(f"cannot read {uri}: {short_error(exc)}") from exc

    def replace_if_unchanged(self, uri: str, data: bytes, revision: str) -> bool:
        blob = self._blob_client(uri)
        return self._unless_changed(
            uri, "replace", lambda: blob.upload_blob(data, overwrite=True, **_if_unchanged(revision))
        )

    def delete_if_unchanged(self, uri: str, revision: str) -> bool:
        blob = self._blob_client(uri)
        return self._unless_changed(uri, "delete", lambda: blob.delete_blob(**_if_unchanged(revision)))

    @staticmethod
    def _unless_changed(uri: str, action: str, request: Callable[[], Any]) -> bool:
        from azure.core.exceptions import ResourceModifiedError

        return unless_changed(uri, action, request, (ResourceModifiedError, *missing_errors()))

    def presigned_url(self, uri: str, expires_in: int) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        blob = self._blob_client(uri)
        account_key = getattr(blob.credential, "account_key", None)
        if not account_key:
            raise StorageError(
                f"cannot presign {uri}: a SAS is signed with the account's key (give a connection string)"
            )
        sas = generate_blob_sas(
            blob.account_name,
            blob.container_name,
            blob.blob_name,
            account_key=account_key,
            permission=BlobSasPermissions(read=True),
            expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=expires_in),
        )
        return f"{blob.url}?{sas}"

    def _blob_client(self, uri: str) -> Any:
        bucket, key = bucket_and_key(uri)
        return self._service(uri).get_blob_client(bucket, key)

    def _container(self, uri: str) -> Any:
        return self._service(uri).get_container_client(bucket_and_key(uri)[0])

    def _service(self, uri: str) -> Any:
        if "client" not in self.params:
            raise StorageError(
                f"cannot reach {uri}: Azure Blob needs a client (set {AZURE_CONNECTION_ENV} "
                "or pass wasb_conn_id)"
            )
        return self.params["client"]

    def _properties(self, uri: str) -> Any:
        try:
            return self._blob_client(uri).get_blob_properties()
        except missing_errors():
            return None
        except storage_errors() as exc:
            raise StorageError(f"cannot check {uri}: {short_error(exc)}") from exc


def _azure_fingerprint(uri: str, properties: Any) -> str:
    # Content-MD5 names the content when the uploader set it; an ETag names one version of one blob,
    # with the blob's URI in one spelling (az://, never azure://) so both spellings share results.
    md5 = properties.content_settings.content_md5
    if md5:
        return f"md5:{bytes(md5).hex()}:{properties.size}"
    # A listing gives the ETag bare, a blob's properties give it quoted (as the HTTP header has it).
    return f'etag:{listed_uri(uri)}:"{properties.etag.strip(chr(34))}"'


def _azure_version(properties: Any) -> str:
    # Quoted, as a blob's own properties give it; a listing gives it bare.
    return f'etag:"{properties.etag.strip(chr(34))}"'


def _if_unchanged(etag: str) -> dict[str, Any]:
    from azure.core import MatchConditions

    return {"etag": etag, "match_condition": MatchConditions.IfNotModified}


@functools.cache
def _azure_client(connection_string: str) -> Any:
    try:
        from azure.storage.blob import BlobServiceClient
    except ImportError as exc:
        raise StorageError(
            f"{AZURE_CONNECTION_ENV} is set but azure-storage-blob is not installed; "
            "pip install 'airflow-provider-removebg[azure]'"
        ) from exc
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    # azure-core's own session pools 10 connections, too few for a run's threads (as for S3 and
    # GCS). Its pipeline retries; the adapter must not (azure-core mounts its adapter the same way).
    session = requests.Session()
    pooled = HTTPAdapter(
        pool_maxsize=POOL_CONNECTIONS, max_retries=Retry(total=False, redirect=False, raise_on_status=False)
    )
    session.mount("https://", pooled)
    session.mount("http://", pooled)
    # The session, not a transport: the SDK builds its transport around it with the storage's
    # timeouts (20 s to connect, 60 s per read), where a transport of ours would wait azure-core's 300 s.
    return BlobServiceClient.from_connection_string(connection_string, session=session, session_owner=False)
