"""Everything saev_dagster takes from Dagster's private modules (``dagster._*``), in one place: a Dagster upgrade
that moves one breaks this import and nothing else. Each was looked for in dagster 1.13's public API (the names
``import dagster`` exports, and the API docs) and is not there.

Not here on purpose: Dagster's private ``observe`` (an in-process observation run). The sources are observed by a
sensor that reports runless events (``DagsterInstance.report_runless_asset_event``, public), so no run is needed.
"""

# The tag under which an observation carries its data version ("dagster/data_version"). An observation run writes it
# from ObserveResult.data_version; the recording op also logs, as dg.AssetObservation events, observations of the
# sources it read, and they must carry the same tag for the recording's input data versions to be theirs. Public and
# missing: dg.AssetObservation takes no data_version, and no constant for the tag is exported. Imported rather than
# spelt out so a renamed tag fails here, not silently.
# Checks a value against a config schema and says which key is wrong, without building a job: how the k8s executor
# config is checked when the code location loads instead of when the first run starts. Public and missing: an
# executor's ``configured(...)`` is checked only at launch; dg.validate_run_config needs a whole job; neither
# ExecutorDefinition.config_schema nor its resolve_config is marked public.
from dagster._config import process_config
from dagster._core.definitions.data_version import DATA_VERSION_TAG

# Launching a run of the workspace's code location from Python, as the UI does (`saev_dagster.launch`): load the
# workspace file like `dagster dev` (a managed code server), pick a job subset by asset selection, and create the
# run with the code location's origin so it shows on the Jobs page and the timeline. Public and missing: the
# public launchers (`execute_job`, `materialize`, `execute_in_process`) create runs without a code location origin,
# and `DagsterGraphQLClient` needs a running webserver.
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget

# The latest tick of a cron string at or before a time (the observation sensor observes once per [automation]
# observe_cron tick). Public and missing: cron schedules are public, but no function that evaluates a cron string
# is exported; Dagster's own is used so the sensor reads a cron exactly as a schedule would.
from dagster._utils.schedules import get_latest_completed_cron_tick


def latest_cron_tick(cron: str, now):
    return get_latest_completed_cron_tick(cron, now, "UTC")


__all__ = [
    "DATA_VERSION_TAG",
    "JobSubsetSelector",
    "WorkspaceFileTarget",
    "WorkspaceProcessContext",
    "latest_cron_tick",
    "process_config",
]
