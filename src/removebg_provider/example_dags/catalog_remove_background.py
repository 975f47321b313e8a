"""Daily catalog background removal: plan the day's manifest, process its shards in parallel, merge.

Every day at midnight (UTC) the manifest of that day (`{{ ds }}` in the default URIs) is cut
into shards; each shard is a mapped task that sends its images to the API through the
`removebg_default` connection, checkpointing every batch so a retried shard bills nothing twice;
the merge writes the enriched manifest (every row once, with its `removebg_*` columns) even when
some shards failed, and fails when more than 5 % of the rows failed.

Connection `removebg_default`: type `removebg`, host = API base URL (empty for the public
Ximilar API), password = API token; e.g. as an environment variable
`AIRFLOW_CONN_REMOVEBG_DEFAULT='{"conn_type": "removebg", "host": "http://localhost:8765",
"password": "..."}'`.

Pool `removebg_api`: caps concurrent API use across every DAG that uses it. Its slots are a
budget of concurrent API requests: each shard task takes as many slots as it keeps requests in
flight (`concurrency`, 8 here), so give the pool at least 8 slots; 16 lets two shards run at
once across all DAGs. Create it once, in the UI (Admin -> Pools) or with

    airflow pools set removebg_api 16 "Concurrent requests to the Remove Background API"

The scheduler leaves tasks of a missing pool waiting, so create it before the first scheduled
run; `airflow dags test` runs tasks without consulting pools and works without it.

Params (set them with `airflow dags trigger -c '{...}'` or `airflow dags test -c '{...}'`): the
default URIs live under $REMOVEBG_DEMO_DIR (default: `$AIRFLOW_HOME/removebg_demo`; `make demo`
sets the repository's `.work/demo`), and every literal `{{ ds }}` inside a Param value is replaced
by the run's logical date. The merge writes a
contact-sheet report next to the enriched manifest; set `report_base_url` to the http(s) URL that
serves that folder to get a "Remove-background report" button on the merge task.

Every day's output prefix is new (`{{ ds }}`), so the result store lives apart from it, under the
stable `cache_prefix` Param: day 2 sends (and bills) only the images that are new or changed since
an earlier day; the others are copied from the store into the day's prefix.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Asset, Param

from removebg_provider.operators import remove_background_task_group
from removebg_provider.vocabulary import MODES

DEMO_DIR = os.path.abspath(
    os.environ.get("REMOVEBG_DEMO_DIR")
    or Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "removebg_demo"
)
POOL = "removebg_api"


def _daily(param: str) -> str:
    """A template reading `param` with `{{ ds }}` inside its value replaced by the run's date.

    A run triggered without a logical date (`airflow dags trigger` without `-l`) has no `ds`; its
    `run_after` date stands in.
    """
    return "{{ params." + param + " | replace('{{ ds }}', (logical_date or dag_run.run_after) | ds) }}"


with DAG(
    dag_id="catalog_remove_background",
    description="Remove the backgrounds of the day's catalog photos and write an enriched manifest",
    schedule="@daily",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "manifest_uri": Param(
            f"{DEMO_DIR}/manifests/{{{{ ds }}}}/products.csv",
            type="string",
            description="The day's manifest (.csv, .parquet or .jsonl; path or s3://, gs://, azure:// URI)",
        ),
        "output_prefix": Param(
            f"{DEMO_DIR}/cutouts/{{{{ ds }}}}", type="string", description="Where the cutouts are written"
        ),
        "output_manifest_uri": Param(
            f"{DEMO_DIR}/enriched/{{{{ ds }}}}/products.parquet",
            type="string",
            description="Where the enriched manifest is written",
        ),
        "mode": Param(
            None,
            type=["string", "null"],
            enum=[*MODES, None],
            description="API endpoint (null: the removebg connection's mode, else fast)",
        ),
        "image_column": Param("image_url", type="string", description="Column with image URLs or paths"),
        "id_column": Param(
            "sku", type=["string", "null"], description="Column of unique row ids (null: derived from images)"
        ),
        "binary_mask": Param(False, type="boolean", description="Also store a binary mask per image"),
        "white_background": Param(False, type="boolean", description="Also store a white-background jpg"),
        "shard_size": Param(1000, type="integer", minimum=1, description="Rows per mapped shard task"),
        "cache_prefix": Param(
            f"{DEMO_DIR}/removebg_cache",
            type="string",
            description=(
                "The result store every day's run shares (keep it stable: no {{ ds }}): an image whose "
                "content and options already have a cutout is not sent or billed again"
            ),
        ),
        "fingerprint_column": Param(
            None,
            type=["string", "null"],
            description="Column identifying each image's content, e.g. image_md5 (null: from the image)",
        ),
        "allow_private_urls": Param(
            False,
            type="boolean",
            description=(
                "Let the run describe (for the result store) and the report fetch http(s) images at "
                "loopback and private addresses (photos served inside your network; refused by default)"
            ),
        ),
        "report_base_url": Param(
            None,
            type=["string", "null"],
            description=(
                "http(s) URL serving the enriched manifest's folder: the merge task then links to "
                "the run report (null: no link)"
            ),
        ),
    },
    tags=["removebg", "catalog"],
    doc_md=__doc__,
) as dag:
    remove_background_task_group(
        manifest_uri=_daily("manifest_uri"),
        output_prefix=_daily("output_prefix"),
        output_manifest_uri=_daily("output_manifest_uri"),
        mode="{{ params.mode }}",
        image_column="{{ params.image_column }}",
        id_column="{{ params.id_column }}",
        binary_mask="{{ params.binary_mask }}",
        white_background="{{ params.white_background }}",
        shard_size="{{ params.shard_size }}",
        cache_prefix="{{ params.cache_prefix }}",
        fingerprint_column="{{ params.fingerprint_column }}",
        allow_private_urls="{{ params.allow_private_urls }}",
        report_base_url=_daily("report_base_url"),
        concurrency=8,
        removebg_conn_id="removebg_default",
        pool=POOL,
        outlets=[Asset(name="catalog_enriched_manifests", uri=Path(DEMO_DIR, "enriched").as_uri())],
    )
