"""Airflow operators and the task group of the Remove Background provider."""

from removebg_provider.operators.links import RemoveBackgroundReportLink
from removebg_provider.operators.removebg import (
    MergeEnrichedManifestOperator,
    PlanManifestShardsOperator,
    ProcessManifestShardOperator,
    RemoveBackgroundOperator,
    remove_background_task_group,
)

__all__ = [
    "MergeEnrichedManifestOperator",
    "PlanManifestShardsOperator",
    "ProcessManifestShardOperator",
    "RemoveBackgroundOperator",
    "RemoveBackgroundReportLink",
    "remove_background_task_group",
]
