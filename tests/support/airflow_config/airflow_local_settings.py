"""Cluster policy of the test deployments: a failed task is retried after 5 s, not the DAG's minute.

Airflow imports `airflow_local_settings` from its PYTHONPATH; the test deployments put this folder
there. The example DAG asks for `retry_delay=1 minute`, right in production; a policy is how an
operator overrides task settings deployment-wide without touching DAG files, and it keeps the
worker-loss test short.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import BaseOperator

RETRY_DELAY = timedelta(seconds=5)


def task_policy(task: BaseOperator) -> None:
    task.retry_delay = RETRY_DELAY
