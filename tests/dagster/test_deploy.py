"""Scale-out configuration, loaded without a cluster: the k8s executor config fits dagster_k8s's schema and reaches
the definitions, the GPU requests sit on the steps that need them, and the Helm values agree with both."""

import json
import os

import dagster as dg
import pytest
import yaml

from saev_dagster import deployment
from saev_dagster.definitions import build_definitions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = "nvidia.com/gpu"


def test_the_k8s_executor_config_loads_into_the_definitions():
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is a dev dependency (pip install -e '.[dev]')")
    defs = build_definitions(executor="k8s")
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("layer_assets")
    assert job.executor_def.name == "saev_k8s"
    with open(deployment.DEFAULT_K8S_CONFIG) as f:
        want = yaml.safe_load(f)
    resolved = job.executor_def.config_schema.resolve_config({})  # what a launched run's executor gets
    assert resolved.success
    got = resolved.value["config"]
    for key in ("job_namespace", "max_concurrent", "env_vars", "volume_mounts"):
        assert got[key] == want[key], key
    assert set(got["per_step_k8s_config"]) == set(want["per_step_k8s_config"])

    # GPU requests: the recording ops by op tag, training and visuals by step name in the executor config
    ops = {op.name: op for op in job.graph.iterate_op_defs()}
    record = ops["record_activations_part"]
    assert json.loads(record.tags["dagster-k8s/config"])["container_config"]["resources"]["limits"][GPU] == "1"
    for step in want["per_step_k8s_config"]:
        assert step in ops, f"per_step_k8s_config names {step!r}, which is no step of the job"
        assert want["per_step_k8s_config"][step]["container_config"]["resources"]["limits"][GPU] == "1"


def test_a_cpu_pipeline_asks_for_no_gpu():
    assert deployment.choose_executor("multiprocess") is None
    from saev_dagster.assets.activations import gpu_op_tags

    assert gpu_op_tags("cpu") == {} and GPU in str(gpu_op_tags("cuda"))


def test_bad_executor_choices_are_clear(tmp_path, monkeypatch):
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is a dev dependency (pip install -e '.[dev]')")
    with pytest.raises(deployment.ExecutorChoiceError, match=r"SAEV_DAGSTER_EXECUTOR='slurm'.*multiprocess, k8s"):
        deployment.choose_executor("slurm")
    bad = tmp_path / "executor.yaml"
    bad.write_text("job_namespace: dagster\nmax_concurent: 4\n")  # misspelt key
    monkeypatch.setenv("SAEV_K8S_EXECUTOR_CONFIG", str(bad))
    with pytest.raises(deployment.ExecutorChoiceError, match=r"executor.yaml.*max_concurent"):
        deployment.choose_executor("k8s")
    bad.write_text("- a list\n")
    with pytest.raises(deployment.ExecutorChoiceError, match="not a YAML mapping"):
        deployment.choose_executor("k8s")


def test_a_shared_io_folder_carries_op_outputs_between_pods(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEV_DAGSTER_IO_DIR", str(tmp_path / "io"))
    defs = build_definitions()
    assert defs.resources["io_manager"].base_dir == str(tmp_path / "io")
    monkeypatch.delenv("SAEV_DAGSTER_IO_DIR")
    assert "io_manager" not in build_definitions().resources


def test_the_helm_values_run_this_code_location_with_the_k8s_executor():
    with open(os.path.join(ROOT, "deploy", "k8s", "values.yaml")) as f:
        values = yaml.safe_load(f)
    (deployment_values,) = values["dagster-user-deployments"]["deployments"]
    args = deployment_values["dagsterApiGrpcArgs"]
    assert args[args.index("--module-name") + 1] == "saev_dagster.definitions"
    env = {e["name"]: e["value"] for e in deployment_values["env"]}
    assert env["SAEV_DAGSTER_EXECUTOR"] == "k8s"
    with open(deployment.DEFAULT_K8S_CONFIG) as f:
        forwarded = set(yaml.safe_load(f)["env_vars"])
    assert {"SAEV_PIPELINE", "SAEV_DAGSTER_IO_DIR"} <= forwarded & set(env)  # what the step pods need, they get
    mounted = {m["mountPath"] for m in deployment_values["volumeMounts"]}
    assert all(env[k].startswith(tuple(mounted)) for k in ("SAEV_PIPELINE", "SAEV_DAGSTER_IO_DIR"))
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
