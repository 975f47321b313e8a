"""The "Remove-background report" extra link: the run's report at an http(s) URL, or a presigned one."""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from airflow.sdk import BaseOperatorLink, BaseXCom

from removebg_provider.errors import ConfigurationError, StorageError
from removebg_provider.storage import Storage, check_presign_seconds, join_uri, scheme_of

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

REPORT_URL_XCOM_KEY = "report_url"
_WEB_SCHEMES = ("http", "https")


class RemoveBackgroundReportLink(BaseOperatorLink):
    """Button "Remove-background report" on a task that wrote a run report reachable over http(s).

    The task pushes the report's URL under the XCom key `report_url`; without one (no report, or a
    report only in s3://, gs://, azure:// or a local folder, which a browser cannot open from the
    Airflow UI, and neither `report_base_url` nor `report_link_expiry`) the link is empty and the UI
    shows no button.
    """

    name = "Remove-background report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        # TaskInstanceKey is a NamedTuple; Airflow's TIKeyProtocol wrongly asks for settable fields.
        url = BaseXCom.get_value(ti_key=ti_key, key=REPORT_URL_XCOM_KEY)  # type: ignore[arg-type]
        return url if isinstance(url, str) else ""


def report_url(report_uri: str | None, report_base_url: str | None) -> str | None:
    """The report's browser URL: its URI when http(s), else `report_base_url` + its file name, else None.

    `report_base_url` is the http(s) URL at which the enriched manifest's folder is served (a
    bucket website, a CDN, a static file server); the report sits next to the manifest.
    """
    if not report_uri:
        return None
    if scheme_of(report_uri) in _WEB_SCHEMES:
        return report_uri
    if not report_base_url:
        return None
    return join_uri(report_base_url, posixpath.basename(urlparse(report_uri).path))


def report_link(
    report_uri: str | None, report_base_url: str | None, expiry: int | None, storage: Storage
) -> str:
    """The link the task pushes: `report_url`, else (with `expiry`) a presigned URL, else "".

    A presigned URL lets anyone holding it read the report (nothing else) for `expiry` seconds; one
    that cannot be signed (a local report, credentials that cannot sign) is logged, not an error:
    the run itself succeeded.
    """
    url = report_url(report_uri, report_base_url)
    if url is None and report_uri and expiry:
        try:
            url = storage.presigned_url(report_uri, expiry)
        except StorageError as exc:
            log.warning("the report gets no link: %s", exc)
    return url or ""


def check_report_link_expiry(value: int | None, task_id: str) -> int | None:
    """`value` when unset or a lifetime a presigned URL may have; ConfigurationError names the task."""
    if value is None:
        return None
    try:
        return check_presign_seconds(value)
    except ConfigurationError as exc:
        raise ConfigurationError(f"task {task_id!r}: report_link_expiry: {exc}") from exc


def check_report_base_url(value: str | None, task_id: str) -> str | None:
    """`value` when unset or an http(s) URL; "" and "None" (an unset rendered Param) count as unset."""
    if value is None or value.strip() in ("", "None"):
        return None
    if scheme_of(value) not in _WEB_SCHEMES or not urlparse(value).netloc:
        raise ConfigurationError(
            f"task {task_id!r}: report_base_url must be an http(s) URL at which the enriched "
            f"manifest's folder is served, not {value!r}"
        )
    return value
