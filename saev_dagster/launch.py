"""Runs launched through the workspace's code location, as the UI launches them: the workspace file loaded as
`dagster dev` loads it (a code server of its own), each run created from the code location's job with its origin,
and handed to the instance's run launcher (a run worker process). So the demo's runs are the code location's
history: the Jobs page, the timeline and the asset pages show them as if they had been launched from the UI."""

import datetime
import logging
import time

import dagster as dg

from saev_dagster.dagster_private import JobSubsetSelector, WorkspaceFileTarget, WorkspaceProcessContext


class CodeLocationError(Exception):
    """The workspace's code location did not load; the message is Dagster's."""


class Workspace:
    """A workspace file's one code location, open while the ``with`` block runs (its code server stops at exit)."""

    def __init__(self, instance: dg.DagsterInstance, workspace_file: str):
        self.instance = instance
        self._process = WorkspaceProcessContext(
            instance, WorkspaceFileTarget(paths=[workspace_file]), code_server_log_level="WARNING"
        )

    def __enter__(self) -> "Workspace":
        self._process.__enter__()
        self.context = self._process.create_request_context()
        (self.location_name,) = self.context.code_location_names
        if self.context.has_code_location_error(self.location_name):
            error = self.context.get_code_location_error(self.location_name)
            self.close()
            raise CodeLocationError(error.message.strip().splitlines()[-1])
        self.location = self.context.get_code_location(self.location_name)
        (self.repository,) = self.location.get_repositories().values()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._process.__exit__(None, None, None)

    def launch(
        self, job_name: str, assets: list[str], tags: dict | None = None, run_config: dict | None = None
    ) -> dg.DagsterRun:
        """Create and launch a run of ``assets`` (with their checks) in the code location's job; returns at once."""
        keys = [dg.AssetKey(a) for a in assets]
        selector = JobSubsetSelector(self.location_name, self.repository.name, job_name, None, asset_selection=keys)
        job = self.location.get_job(selector)
        run_config = run_config or {}
        plan = self.location.get_execution_plan(job, run_config, None, None, instance=self.instance)
        run = self.instance.create_run(
            job_name=job_name,
            run_id=None,
            run_config=run_config,
            status=dg.DagsterRunStatus.NOT_STARTED,
            tags={**job.tags, **(tags or {})},
            root_run_id=None,
            parent_run_id=None,
            step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
            execution_plan_snapshot=plan.execution_plan_snapshot,
            job_snapshot=job.job_snapshot,
            parent_job_snapshot=job.parent_job_snapshot,
            asset_selection=frozenset(keys),
            asset_check_selection=None,
            resolved_op_selection=None,
            op_selection=None,
            remote_job_origin=job.get_remote_origin(),
            job_code_origin=job.get_python_origin(),
            asset_graph=self.context.asset_graph,
        )
        return self.instance.launch_run(run.run_id, self.context)

    def wait(self, run_id: str, poll_s: float = 0.5) -> dg.DagsterRun:
        """The run once it has finished (succeeded, failed or canceled)."""
        while not (run := self.instance.get_run_by_id(run_id)).is_finished:
            time.sleep(poll_s)
        return run


def step_failures(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The error message of every failed step of a run (empty when none failed)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    return [r.event_log_entry.dagster_event.step_failure_data.error.message.strip() for r in records]


def materializations(instance: dg.DagsterInstance, run_id: str) -> list[dg.AssetMaterialization]:
    """What a run materialized, in order."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return [r.event_log_entry.asset_materialization for r in records]


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Each step's wall time in a run (step key -> seconds from its start to its success)."""
    types = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    starts, seconds = {}, {}
    for entry in instance.all_logs(run_id, of_type=types):
        if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif entry.step_key in starts:
            seconds[entry.step_key] = entry.timestamp - starts[entry.step_key]
    return seconds


def append_event_log(instance: dg.DagsterInstance, run_id: str, path: str, level: int = logging.INFO) -> None:
    """Append a run's event log at ``level`` and above to a text file, one line per event (the UI shows all)."""
    lines = []
    for entry in instance.all_logs(run_id):
        if entry.level >= level and entry.message:
            stamp = datetime.datetime.fromtimestamp(entry.timestamp).isoformat(sep=" ", timespec="seconds")
            where = " ".join(x for x in (entry.job_name, run_id[:8], entry.step_key) if x)
            lines.append(f"{stamp} {logging.getLevelName(entry.level)} {where}: {entry.message}\n")
    with open(path, "a") as f:
        f.writelines(lines)
