"""What every asset of the pipeline shares, written once: its stage tag and group, its kinds, its owners, the GPU
pool of the heavy ones, and when it is brought up to date (eagerly after its upstream; sources are observed by the
observation sensor, ``saev_dagster.observation``)."""

import dagster as dg

OWNERS = ["team:saev"]
GPU_POOL = "gpu"
"""The pool of the steps that hold a ViT or SAEs; deploy/dagster.yaml lets one such step run at a time."""


def stage_asset_kwargs(
    stage: str, kinds: set[str], code_version: str | None = None, *, group: str | None = None, gpu: bool = False
) -> dict:
    """Keyword arguments for ``dg.asset`` (or ``dg.AssetOut``, which takes no pool) of a pipeline stage's asset:
    tagged with its stage, in the stage's group unless ``group`` says otherwise, re-run when its upstream changes,
    and in the GPU pool when ``gpu``."""
    kwargs = {
        "group_name": group or stage,
        "kinds": kinds,
        "tags": {"stage": stage},
        "owners": OWNERS,
        "code_version": code_version,
        "automation_condition": dg.AutomationCondition.eager(),
    }
    if gpu:
        kwargs["pool"] = GPU_POOL
    return kwargs


def source_asset_kwargs(stage: str, kinds: set[str], *, group: str | None = None) -> dict:
    """Keyword arguments for ``dg.observable_source_asset``: tagged and grouped as a stage asset. No automation
    condition: an automated observation would be a run per cron tick, so the observation sensor observes them."""
    return {"group_name": group or stage, "kinds": kinds, "tags": {"stage": stage}}
