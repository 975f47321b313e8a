"""Airflow operators and a task group running the manifest pipeline: whole, or plan, mapped shards, merge."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, BaseOperator, BaseOperatorLink, Context, TaskGroup, TriggerRule, XComArg

from removebg_provider import pipeline
from removebg_provider.errors import ConfigurationError, FailurePolicyError, RunStoppedError
from removebg_provider.hooks.removebg import RemoveBgHook
from removebg_provider.operators.lineage import RunLineage, operator_lineage, run_lineage
from removebg_provider.operators.links import (
    REPORT_URL_XCOM_KEY,
    RemoveBackgroundReportLink,
    check_report_base_url,
    check_report_link_expiry,
    report_link,
)
from removebg_provider.operators.storage_connections import storage_from_connections
from removebg_provider.pipeline.config import CONNECTION_SETTINGS, FIELDS, REQUIRED_FIELDS, options_doc
from removebg_provider.storage import Storage, scheme_of

log = logging.getLogger(__name__)

DEFAULT_MAX_ACTIVE_SHARDS = 4

_DEFAULTS: dict[str, Any] = {f.name: f.default for f in FIELDS if f.default is not dataclasses.MISSING}
_CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS)
_OPTION_FIELDS = tuple(name for name in _CONFIG_FIELDS if name not in REQUIRED_FIELDS)


class _StorageOperator(BaseOperator):
    """Base of every operator here: optional storage connections, resolved only in `execute`."""

    def __init__(
        self,
        *,
        aws_conn_id: str | None = None,
        gcp_conn_id: str | None = None,
        wasb_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self.wasb_conn_id = wasb_conn_id

    def storage(self) -> Storage:
        """The Storage for this task's connections (each SDK's environment defaults without them)."""
        return storage_from_connections(self.aws_conn_id, self.gcp_conn_id, self.wasb_conn_id)

    def _report(self, summary: pipeline.RunSummary, context: Context) -> dict[str, Any]:
        """Log the counts and first errors, describe them on the outlet Assets, return the XCom value."""
        data = summary.to_dict()
        log.info("%s", summary.describe())
        outlet_events = context.get("outlet_events")
        if outlet_events is not None:
            extra = {key: data[key] for key in ("rows", "succeeded", "failed", "output_manifest_uri")}
            for outlet in self.outlets:
                if isinstance(outlet, Asset):
                    outlet_events[outlet].extra.update(extra)
        return data


class _StopOnKillMixin:
    """`on_kill` (Airflow's task runner calls it on SIGTERM) stops the run gracefully.

    No new request is sent; the requests in flight finish and are checkpointed, the rows not reached
    get status 499, and the task fails with RunStoppedError, so a retry resumes without billing the
    finished rows. Airflow sends SIGKILL a few seconds after SIGTERM: what was not checkpointed by
    then is what a retry sends again (at most the requests in flight).
    """

    _stop_requested: threading.Event | None = None

    def on_kill(self) -> None:
        if self._stop_requested is not None:
            log.warning("task killed: no new request is sent; the requests in flight finish")
            self._stop_requested.set()

    def _new_stop_request(self) -> threading.Event:
        # Made in `execute`, not `__init__`: an operator is deep-copied and serialized, an Event is not.
        self._stop_requested = threading.Event()
        return self._stop_requested


class _RunOutputsMixin:
    """For operators that write the enriched manifest: report link, report URL XCom, OpenLineage facets.

    `report_base_url` is the http(s) URL at which the enriched manifest's folder is served; the
    report written next to the manifest then gets a "Remove-background report" link in the UI.
    Without it, `report_link_expiry` (seconds) links a report in s3://, gs:// or az:// through a
    presigned URL that lives that long.
    """

    operator_extra_links: Collection[BaseOperatorLink] = (RemoveBackgroundReportLink(),)
    task_id: str
    report_base_url: str | None
    report_link_expiry: int | None
    _lineage: RunLineage | None = None

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage datasets: manifest in; enriched manifest, output prefix out (or None)."""
        return operator_lineage(self._lineage)

    def _checked_report_base_url(self) -> str | None:
        return check_report_base_url(self.report_base_url, self.task_id)

    def _set_report_options(self, report_base_url: str | None, report_link_expiry: int | None) -> None:
        self.report_base_url = report_base_url
        self.report_link_expiry = check_report_link_expiry(report_link_expiry, self.task_id)
        if not is_templated(report_base_url):
            self._checked_report_base_url()

    def _publishing_failures(
        self,
        produce: Callable[[], pipeline.RunSummary],
        base_url: str | None,
        storage: Storage,
        context: Context,
    ) -> pipeline.RunSummary:
        """Run `produce`; when the run breaks the failure policy, still publish its report, then fail."""
        try:
            return produce()
        except (FailurePolicyError, RunStoppedError) as exc:
            self._publish_report(exc.summary, base_url, storage, context)
            log.error("%s", exc.summary.describe())
            raise

    def _publish_report(
        self, summary: pipeline.RunSummary, base_url: str | None, storage: Storage, context: Context
    ) -> None:
        """Count the rows into the lineage and push the report's browser URL ("" when it has none).

        Always pushed: Airflow reads the extra link after every run, and a missing key is logged as
        an error although nothing went wrong.
        """
        if self._lineage is not None:
            self._lineage = dataclasses.replace(self._lineage, rows=summary.rows)
        url = report_link(summary.report_html_uri, base_url, self.report_link_expiry, storage)
        context["ti"].xcom_push(key=REPORT_URL_XCOM_KEY, value=url)


class _ManifestConfigOperator(_StorageOperator):
    """Base of the operators that take a whole pipeline configuration; every option is a template field.

    Options are the keyword arguments named after PipelineConfig fields, with the same meanings and
    defaults (listed below). Values without a Jinja expression are validated when the DAG is parsed;
    templated values once rendered, in `execute`. Rendered booleans and numbers may be strings
    ("true", "8"): they are converted. `mode`, `max_records_per_request` and `concurrency` left unset
    take the `removebg` connection's extras, else their defaults (task option > connection > default).

    :param removebg_conn_id: the `removebg` connection (API base URL, token, default settings).
    """

    template_fields: Sequence[str] = _CONFIG_FIELDS

    def __init__(
        self,
        *,
        manifest_uri: str,
        output_prefix: str,
        output_manifest_uri: str,
        removebg_conn_id: str = RemoveBgHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        options = {name: kwargs.pop(name) for name in _OPTION_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        self.manifest_uri = manifest_uri
        self.output_prefix = output_prefix
        self.output_manifest_uri = output_manifest_uri
        self.removebg_conn_id = removebg_conn_id
        for name in _OPTION_FIELDS:
            setattr(self, name, options.get(name, _DEFAULTS[name]))
        self._check_static_options()

    def pipeline_config(self) -> pipeline.PipelineConfig:
        """The PipelineConfig of the rendered options; ConfigurationError names the task and the option."""
        return self._build_config({name: getattr(self, name) for name in _CONFIG_FIELDS})

    def resolved_config(self, hook: RemoveBgHook) -> pipeline.PipelineConfig:
        """The rendered options with unset connection-level settings from the connection, else defaults."""
        return self.pipeline_config().resolved(hook.connection_settings())

    def _check_static_options(self) -> None:
        # Templated values are replaced by valid stand-ins so that only literal values are judged now.
        values = {
            name: (_stand_in(name) if is_templated(getattr(self, name)) else getattr(self, name))
            for name in _CONFIG_FIELDS
        }
        self._build_config(values)

    def _build_config(self, values: Mapping[str, Any]) -> pipeline.PipelineConfig:
        try:
            return pipeline.PipelineConfig.from_options(values)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{type(self).__name__} task {self.task_id!r}: {exc}") from exc


class RemoveBackgroundOperator(_StopOnKillMixin, _RunOutputsMixin, _ManifestConfigOperator):
    """Remove the backgrounds of a whole manifest in this one task: plan, every shard, merge.

    Suits manifests one worker handles in a run; split bigger ones with `remove_background_task_group`.
    Returns the run summary (counts by status, first errors, URIs) as XCom. Fails, after writing
    the enriched manifest, when more than `max_failed_fraction` of the rows failed, or when the task
    is killed (`on_kill`): then no new request is sent and the rows not reached get status 499.

    Outlets: when `output_manifest_uri` has no Jinja expression and no `outlets` are given, the
    enriched manifest is the task's Asset. A templated URI names a different object each run,
    so no Asset is guessed: pass `outlets=[Asset(...)]` (e.g. the folder of the daily manifests);
    every outlet Asset's event carries the rendered `output_manifest_uri` and the counts in its extra.

    :param report_base_url: optional http(s) URL at which the enriched manifest's folder is served;
        the run report then gets a "Remove-background report" link (XCom key `report_url`).
    :param report_link_expiry: optional seconds (1 to 604800): without `report_base_url`, a report
        in s3://, gs:// or az:// is linked through a presigned URL that lives that long.
    :param aws_conn_id: optional Amazon connection for s3:// URIs (extra `amazon`).
    :param gcp_conn_id: optional Google connection for gs:// URIs (extra `google`).
    :param wasb_conn_id: optional Azure Blob Storage connection for azure:// URIs (extra `microsoft-azure`).
    """

    template_fields: Sequence[str] = (*_CONFIG_FIELDS, "report_base_url")

    def __init__(
        self, *, report_base_url: str | None = None, report_link_expiry: int | None = None, **kwargs: Any
    ) -> None:
        uri = kwargs.get("output_manifest_uri")
        if kwargs.get("outlets") is None and isinstance(uri, str) and uri and not is_templated(uri):
            kwargs["outlets"] = [manifest_asset(uri)]
        super().__init__(**kwargs)
        self._set_report_options(report_base_url, report_link_expiry)

    def execute(self, context: Context) -> dict[str, Any]:
        hook = RemoveBgHook(self.removebg_conn_id)
        config = self.resolved_config(hook)
        base_url = self._checked_report_base_url()
        storage = self.storage()
        self._lineage = run_lineage(config, storage)
        stop = self._new_stop_request()
        with hook.get_conn(**config.client_settings()) as client:
            summary = self._publishing_failures(
                lambda: pipeline.run(config, client, storage, stop=stop), base_url, storage, context
            )
        self._publish_report(summary, base_url, storage, context)
        return self._report(summary, context)


class PlanManifestShardsOperator(_ManifestConfigOperator):
    """Validate a manifest, cut it into shards under the staging prefix and check the billing budget.

    Returns one small descriptor dict per shard (for `ProcessManifestShardOperator.expand(shard=...)`)
    and pushes the plan's URI under the XCom key `plan_uri` (for the merge, even with zero shards).
    Raises BudgetExceededError, before any request, when the run would bill more than
    `max_billable_records`.
    """

    def execute(self, context: Context) -> list[dict[str, Any]]:
        storage = self.storage()
        plan = pipeline.plan(self.resolved_config(RemoveBgHook(self.removebg_conn_id)), storage)
        estimate = pipeline.check_budget(plan, storage)
        if estimate is not None:
            log.info("billing estimate: %s", estimate.to_dict())
        context["ti"].xcom_push(key="plan_uri", value=plan.uri)
        return [shard.to_dict() for shard in plan.shards]


class ProcessManifestShardOperator(_StopOnKillMixin, _StorageOperator):
    """Remove the backgrounds of one planned shard; map it over the plan with `.expand(shard=...)`.

    Every finished batch is checkpointed, so a retry sends no request for a row that already
    succeeded and bills nothing twice. Failed rows do not fail the task (the merge applies the
    run-wide `max_failed_fraction`); it fails, and is retried, when the shard cannot finish:
    the API refused the token, credits ran out, storage failed, the worker died, or the task was
    killed (`on_kill`: no new request is sent, the rows not reached are stored with status 499).

    :param shard: one descriptor dict returned by PlanManifestShardsOperator.
    :param removebg_conn_id: the `removebg` connection (API base URL and token).
    """

    template_fields: Sequence[str] = ("shard",)

    def __init__(
        self,
        *,
        shard: dict[str, Any],
        removebg_conn_id: str = RemoveBgHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.shard = shard
        self.removebg_conn_id = removebg_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            descriptor = pipeline.ShardDescriptor.from_dict(dict(self.shard))
        except TypeError as exc:
            raise ConfigurationError(
                f"task {self.task_id!r}: shard must be a descriptor from PlanManifestShardsOperator, "
                f"not {self.shard!r}"
            ) from exc
        storage = self.storage()
        plan = pipeline.load_plan(descriptor.plan_uri, storage)
        # Failed rows are judged once, run-wide, by the merge (as `pipeline.run` does): a retry
        # cannot fix an unreadable image, and the API client already retried transient failures.
        relaxed = dataclasses.replace(plan.config, max_failed_fraction=1.0)
        plan = dataclasses.replace(plan, config=relaxed)
        # The plan holds the settings the plan task resolved; the client is built to match them.
        stop = self._new_stop_request()
        with RemoveBgHook(self.removebg_conn_id).get_conn(**plan.config.client_settings()) as client:
            summary = pipeline.process_shard(descriptor, plan, client, storage, stop=stop)
        if stop.is_set():
            raise RunStoppedError(
                f"task {self.task_id!r} was killed: shard {descriptor.index} stopped with "
                f"{summary.succeeded} of {summary.rows} rows done; a retry finishes it",
                summary=summary,
            )
        return self._report(summary, context)


class MergeEnrichedManifestOperator(_RunOutputsMixin, _StorageOperator):
    """Write the enriched manifest from the stored shard results, then apply the run's failure policy.

    Run it with `trigger_rule=TriggerRule.ALL_DONE` (as the task group does): it then writes the
    manifest even when shard tasks failed. Every input row appears exactly once; rows of a shard
    whose task stored no results get status 504. The task fails, after writing, when more than
    `max_failed_fraction` of all rows failed. Returns the run summary as XCom.

    :param plan_uri: the plan's URI, usually `plan_task.output["plan_uri"]`.
    :param report_base_url: optional http(s) URL at which the enriched manifest's folder is served;
        the run report then gets a "Remove-background report" link (XCom key `report_url`).
    :param report_link_expiry: optional seconds (1 to 604800): without `report_base_url`, a report
        in s3://, gs:// or az:// is linked through a presigned URL that lives that long.
    """

    template_fields: Sequence[str] = ("plan_uri", "report_base_url")

    def __init__(
        self,
        *,
        plan_uri: str | XComArg,
        report_base_url: str | None = None,
        report_link_expiry: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_uri = plan_uri
        self._set_report_options(report_base_url, report_link_expiry)

    def execute(self, context: Context) -> dict[str, Any]:
        if not isinstance(self.plan_uri, str):
            raise ConfigurationError(f"task {self.task_id!r}: plan_uri must be a URI, not {self.plan_uri!r}")
        base_url = self._checked_report_base_url()
        storage = self.storage()
        plan = pipeline.load_plan(self.plan_uri, storage)
        config = plan.config
        self._lineage = run_lineage(config, storage)
        summary = self._publishing_failures(lambda: pipeline.merge(plan, storage), base_url, storage, context)
        self._publish_report(summary, base_url, storage, context)
        return self._report(summary, context)


def remove_background_task_group(
    *,
    manifest_uri: str,
    output_prefix: str,
    output_manifest_uri: str,
    group_id: str = "remove_background",
    removebg_conn_id: str = RemoveBgHook.default_conn_name,
    pool: str | None = None,
    pool_slots: int | None = None,
    max_active_tis_per_dagrun: int = DEFAULT_MAX_ACTIVE_SHARDS,
    outlets: Sequence[Asset] | None = None,
    report_base_url: str | None = None,
    report_link_expiry: int | None = None,
    aws_conn_id: str | None = None,
    gcp_conn_id: str | None = None,
    wasb_conn_id: str | None = None,
    **options: Any,
) -> TaskGroup:
    """Plan -> one mapped task per shard -> merge, as a task group; create it inside a DAG.

    `options` are the pipeline options of PlanManifestShardsOperator (mode, shard_size, ...).
    Only the shard tasks call the API, so only they take `pool`; each takes `pool_slots` slots,
    by default its `concurrency` (requests in flight), so a pool's size is a budget of concurrent
    API requests: give it at least `concurrency` slots. At most `max_active_tis_per_dagrun` shards
    of one run are processed at once. The merge runs when every shard task has finished, failed or
    not, and is not retried; its outlets default to the enriched manifest's Asset when that URI has
    no Jinja expression. With `report_base_url` (the http(s) URL serving the enriched manifest's
    folder) the merge task links to the run report; without it, `report_link_expiry` (seconds) links
    a report in s3://, gs:// or az:// through a presigned URL that lives that long.
    """
    storage = {"aws_conn_id": aws_conn_id, "gcp_conn_id": gcp_conn_id, "wasb_conn_id": wasb_conn_id}
    concurrency = options.get("concurrency") or CONNECTION_SETTINGS["concurrency"]
    if pool_slots is None:
        pool_slots = concurrency if isinstance(concurrency, int) else 1
    if outlets is None and not is_templated(output_manifest_uri):
        outlets = [manifest_asset(output_manifest_uri)]
    with TaskGroup(group_id=group_id) as group:
        plan_task = PlanManifestShardsOperator(
            task_id="plan",
            manifest_uri=manifest_uri,
            output_prefix=output_prefix,
            output_manifest_uri=output_manifest_uri,
            removebg_conn_id=removebg_conn_id,
            **options,
            **storage,
        )
        shard_tasks = ProcessManifestShardOperator.partial(
            task_id="process_shard",
            removebg_conn_id=removebg_conn_id,
            pool=pool,
            pool_slots=pool_slots,
            max_active_tis_per_dagrun=max_active_tis_per_dagrun,
            **storage,
        ).expand(shard=plan_task.output)
        merge_task = MergeEnrichedManifestOperator(
            task_id="merge",
            plan_uri=XComArg(plan_task, key="plan_uri"),
            trigger_rule=TriggerRule.ALL_DONE,
            # A retry would merge the same stored results and break the same policy again.
            retries=0,
            outlets=list(outlets or []),
            report_base_url=report_base_url,
            report_link_expiry=report_link_expiry,
            **storage,
        )
        shard_tasks >> merge_task
    return group


def is_templated(value: Any) -> bool:
    """Whether a value is only known once rendered: a Jinja expression or an XCom reference."""
    if isinstance(value, XComArg):
        return True
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def manifest_asset(uri: str) -> Asset:
    """The Asset of an enriched manifest; a plain path becomes an absolute file:// URI."""
    if scheme_of(uri) == "file" and not uri.startswith("file://"):
        return Asset(uri=Path(uri).absolute().as_uri())
    return Asset(uri=uri)


def _stand_in(name: str) -> Any:
    """A valid value for a templated option, so only the literal ones are judged at parse time."""
    # Required URIs get distinct stand-ins: equal ones would be refused as overwriting the input.
    return _DEFAULTS.get(name, f"stand-in-{name}")


for _operator in (RemoveBackgroundOperator, PlanManifestShardsOperator):
    _operator.__doc__ = f"{_operator.__doc__}\n{options_doc()}"
