"""The observation sensor: on every [automation] observe_cron tick it looks at the sources (ViT checkpoint, images,
the [watch] folder) and reports what changed as runless observation events, which the automation sensor reads like
those of an observation run. Nothing changed costs a few ``stat`` calls and adds no run and no event.

Why not the sources' own cron automation condition: each of its ticks is an observation run (~290 runs a day in the
Runs list at every 5 minutes) that hashes the checkpoint again."""

import datetime

import dagster as dg

from saev_core.errors import UserError
from saev_dagster.assets.dropped import SAE_FILES, changed_files
from saev_dagster.assets.sources import changed_observations
from saev_dagster.dagster_private import latest_cron_tick
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.resources import SaevPipeline

SENSOR = "saev_observe_sources"


def changes(pipe, instance: dg.DagsterInstance, on_watch_error=None) -> tuple[list[dg.AssetObservation], list[str]]:
    """(observations that changed, new watched-folder partitions) of a pipeline's sources. A watched folder that
    cannot be listed raises, or goes to ``on_watch_error`` (its message) when given, so the others are still
    observed."""
    events = changed_observations(pipe, instance)
    new = []
    if pipe.watch.folder:
        try:
            new, watched = changed_files(pipe.watch.folder, instance)
        except UserError as err:
            if on_watch_error is None:
                raise
            on_watch_error(str(err))
        else:
            events += watched
    return events, new


def build_observation_sensor(observe_cron: str) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Observes the ViT checkpoint, the images and the [watch] folder on [automation] observe_cron "
        f"({observe_cron}); reports only what changed, as observation events without a run (the checkpoint is "
        "hashed only when its size, mtime or inode changed).",
    )
    @user_errors_fail_cleanly
    def observe(context: dg.SensorEvaluationContext, saev_pipeline: SaevPipeline):
        tick = latest_cron_tick(observe_cron, datetime.datetime.now(datetime.UTC)).timestamp()
        if context.cursor and float(context.cursor) >= tick:
            return dg.SkipReason(f"no observe_cron tick ({observe_cron}) since the last look")
        events, new = changes(saev_pipeline.load(), context.instance, on_watch_error=context.log.warning)
        return dg.SensorResult(
            skip_reason=None if events or new else "no source changed (stat only)",
            asset_events=events,
            dynamic_partitions_requests=[SAE_FILES.build_add_request(new)] if new else None,
            cursor=str(tick),
        )

    return observe


def observe_sources(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[dg.AssetObservation]:
    """Observe a code location's sources now, as one sensor tick does (no run); returns what was reported."""
    events, new = changes(defs.resources["saev_pipeline"].load(), instance)
    if new:
        instance.add_dynamic_partitions(SAE_FILES.name, new)
    for event in events:
        instance.report_runless_asset_event(event)
    return events
