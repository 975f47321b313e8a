"""The "Remove-background report" extra link: the run's contact-sheet report at its http(s) URL."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from airflow.sdk import BaseOperatorLink, BaseXCom

from removebg_provider.errors import ConfigurationError
from removebg_provider.storage import join_uri, scheme_of

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

REPORT_URL_XCOM_KEY = "report_url"
_WEB_SCHEMES = ("http", "https")


class RemoveBackgroundReportLink(BaseOperatorLink):
    """Button "Remove-background report" on a task that wrote a run report reachable over http(s).

    The task pushes the report's URL under the XCom key `report_url`; without one (no report, or a
    report only in s3://, gs://, azure:// or a local folder, which a browser cannot open from the
    Airflow UI, and no `report_base_url`) the link is empty and the UI shows no button.
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
