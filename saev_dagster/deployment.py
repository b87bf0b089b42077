"""Where the steps of a launched run execute, with the same assets: Dagster's default executor (multiprocess, one
process per step) on one machine, or ``dagster_k8s.k8s_job_executor`` (one Kubernetes Job per step) on a cluster.

Chosen by $SAEV_DAGSTER_EXECUTOR ("multiprocess", the default, or "k8s"); the k8s executor's config is the YAML at
$SAEV_K8S_EXECUTOR_CONFIG, else the packaged ``k8s_executor.yaml``. dagster_k8s is imported only when chosen.
"""

import os

import dagster as dg
import yaml

from saev_dagster.dagster_private import process_config

EXECUTORS = ("multiprocess", "k8s")
DEFAULT_K8S_CONFIG = os.path.join(os.path.dirname(__file__), "k8s_executor.yaml")


class ExecutorChoiceError(Exception):
    """$SAEV_DAGSTER_EXECUTOR or the k8s executor config cannot be used; the message says how to fix it."""


def choose_executor(name: str | None = None) -> dg.ExecutorDefinition | None:
    """The executor for the code location (None: Dagster's default, multiprocess for launched runs)."""
    name = name or os.environ.get("SAEV_DAGSTER_EXECUTOR") or "multiprocess"
    if name not in EXECUTORS:
        raise ExecutorChoiceError(f"SAEV_DAGSTER_EXECUTOR={name!r}: expected one of {', '.join(EXECUTORS)}.")
    if name == "multiprocess":
        return None
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ExecutorChoiceError(
            "SAEV_DAGSTER_EXECUTOR=k8s needs the dagster-k8s package: pip install 'saev-dagster[k8s]'."
        ) from None
    cfg = k8s_executor_config()
    checked = process_config(k8s_job_executor.config_schema.as_field().config_type, cfg)
    if not checked.success:
        path = os.environ.get("SAEV_K8S_EXECUTOR_CONFIG") or DEFAULT_K8S_CONFIG
        raise ExecutorChoiceError(
            f"The k8s executor config {path!r} does not fit dagster_k8s.k8s_job_executor: "
            f"{checked.errors[0].message.split(' Expected:')[0]}"
        )
    return k8s_job_executor.configured(cfg, name="saev_k8s")


def io_manager_resources() -> dict:
    """The IO manager that carries op outputs between steps (the recording fan-out's part results). Steps in
    separate pods need a folder they all mount: $SAEV_DAGSTER_IO_DIR; unset, Dagster's default (under
    $DAGSTER_HOME) serves one machine."""
    folder = os.environ.get("SAEV_DAGSTER_IO_DIR")
    return {"io_manager": dg.FilesystemIOManager(base_dir=folder)} if folder else {}


def k8s_executor_config(path: str | None = None) -> dict:
    path = path or os.environ.get("SAEV_K8S_EXECUTOR_CONFIG") or DEFAULT_K8S_CONFIG
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ExecutorChoiceError(
            f"Cannot read the k8s executor config {path!r} ($SAEV_K8S_EXECUTOR_CONFIG): {err}."
        ) from None
    if not isinstance(cfg, dict):
        raise ExecutorChoiceError(f"The k8s executor config {path!r} is not a YAML mapping of k8s_job_executor fields.")
    return cfg
