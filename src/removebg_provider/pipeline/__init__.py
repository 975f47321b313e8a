"""The manifest pipeline, resumable, without Airflow: plan -> shards -> batches -> API -> copy -> merge.

Its rooms: `config` (the settings), `planning` (manifest -> shards), `duplicates` (repeated ids and
shared images), `shard` (a shard's batches, requests and copies), `workers` (the threads that run
batches, shard after shard), `budget` (the cap on records sent), `checkpoints` (durable progress),
`store` (the result store), `store_index` (its index, joined to the next plan), `lookups` (a shard's
side of the store), `results` (row results and summaries), `merging` (the enriched manifest) and
`running` (all of it in one process).
"""

from removebg_provider.pipeline.budget import Budget
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.merging import merge
from removebg_provider.pipeline.planning import Plan, ShardDescriptor, load_plan, plan
from removebg_provider.pipeline.results import BillingEstimate, RowResult, RunSummary
from removebg_provider.pipeline.running import check_budget, estimate_billing, run
from removebg_provider.pipeline.shard import process_shard

__all__ = [
    "BillingEstimate",
    "Budget",
    "PipelineConfig",
    "Plan",
    "RowResult",
    "RunSummary",
    "ShardDescriptor",
    "check_budget",
    "estimate_billing",
    "load_plan",
    "merge",
    "plan",
    "process_shard",
    "run",
]
