"""The Dagster layer: the code location loads without torch, the asset graph is right, a backfill of every layer is
one run and one store, new checkpoint weights make the activations stale and re-requested, and the whole graph
materializes with its checks."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import dagster as dg
import pytest

from saev_core.store import ActivationStore
from saev_dagster.definitions import PipelineFileError, build_definitions
from saev_dagster.observation import observe_sources
from tests.helpers import dagster_dev_argv, same_files, tiny_pipeline_text, write_images
from tests.processes import stop_group

LAYERS = [0, -1]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def own_ckpt(tmp_path, tiny_clip_ckpt) -> str:
    """A private copy of the tiny checkpoint: tests here overwrite it."""
    shutil.copy(tiny_clip_ckpt.split("/", 1)[1], tmp_path / "tiny.pt")
    return f"saev-tiny-clip/{tmp_path / 'tiny.pt'}"


@pytest.fixture
def max_frac_dead() -> float:
    return 1.0


@pytest.fixture
def pipeline_file(tmp_path, own_ckpt, monkeypatch, max_frac_dead):
    write_images(tmp_path / "imgs", 6)
    path = tmp_path / "pipeline.toml"
    path.write_text(
        tiny_pipeline_text(tmp_path, own_ckpt, LAYERS, max_frac_dead)
        + f"""
[watch]
folder = "{tmp_path / "watch"}"
"""
    )
    (tmp_path / "watch").mkdir()
    monkeypatch.setenv("SAEV_PIPELINE", str(path))
    return path


def materialize(defs: dg.Definitions, selection, instance, **kwargs) -> dg.ExecuteInProcessResult:
    """Materialize part of a code location in-process, with its resources and checks."""
    return dg.materialize(
        [*defs.assets, *defs.asset_checks], selection=selection, instance=instance, resources=defs.resources, **kwargs
    )


def test_definitions_import_no_torch():
    code = (
        "import sys, saev_dagster.definitions as d; d.defs(); "
        "print(sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_definitions_reads_no_pipeline_file_and_imports_no_torch(tmp_path):
    """The code location is built when Dagster loads it (`@dg.definitions`), not when the module is imported: with
    an unreadable pipeline file the import still succeeds, and only loading fails, naming the file."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[activations]\nvit_bathc_size = 3\n")
    code = (
        "import sys, saev_dagster.definitions as d\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))\n"
        "try:\n    d.defs()\nexcept d.PipelineFileError as err:\n    print('load failed:', err)\n"
    )
    env = {**os.environ, "SAEV_PIPELINE": str(bad)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    imported, failed = out.strip().split("\n", 1)
    assert imported == "[]"
    assert failed.startswith("load failed:") and "bad.toml" in failed and "vit_bathc_size" in failed


def test_only_one_module_imports_from_dagsters_private_modules():
    """A Dagster upgrade that moves a private name breaks saev_dagster/dagster_private.py and nothing else."""
    import re

    package = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "saev_dagster")
    private = re.compile(r"^\s*(from|import)\s+dagster\._", re.M)
    importers = sorted(
        os.path.relpath(os.path.join(folder, name), package)
        for folder, _, names in os.walk(package)
        for name in names
        if name.endswith(".py") and private.search(open(os.path.join(folder, name)).read())
    )
    assert importers == ["dagster_private.py"]


def test_asset_graph_of_the_demo_pipeline():
    from saev_core.pipeline.file import load_pipeline
    from saev_dagster import definitions

    defs = definitions.defs()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"vit_checkpoint", "image_source", "activations"} <= keys
    acts = defs.resolve_assets_def("activations")
    assert acts.partitions_def.get_partition_keys() == [str(x) for x in load_pipeline().activations.vit_layers]
    assert acts.backfill_policy == dg.BackfillPolicy.single_run()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("activations")).parent_keys}
    assert parents == {"vit_checkpoint", "image_source"}

    assert keys == {
        "vit_checkpoint",
        "image_source",
        "activations",
        "sae_sweep",
        "topk_visuals",
        "sweep_report",
        "sae_checkpoints",  # the demo watches a folder
        "dropped_sae_visuals",
        "probe_metrics",  # the demo has patch labels and a [probe] table
    }
    # the gallery shows the probes: it follows them
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("topk_visuals")).parent_keys} == {
        "sae_sweep",
        "probe_metrics",
    }
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("sweep_report")).parent_keys} == {
        "sae_sweep",
        "topk_visuals",
        "probe_metrics",
    }
    dg.Definitions.validate_loadable(defs)
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == {
        "vit_checkpoint": "recording",
        "image_source": "recording",
        "activations": "recording",
        "sae_sweep": "training",
        "topk_visuals": "visuals",
        "sweep_report": "report",
        "sae_checkpoints": "dropped",
        "dropped_sae_visuals": "dropped",
        "probe_metrics": "probes",
    }
    sweep = defs.resolve_assets_def("sae_sweep")
    assert sweep.partitions_def.get_partition_keys() == acts.partitions_def.get_partition_keys()
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("sae_sweep")).parent_keys} == {"activations"}
    checks = {spec.name: spec for spec in sweep.check_specs}
    assert "sweep_is_healthy" in checks
    assert checks["sweep_is_healthy"].blocking is True
    assert checks["sweep_is_healthy"].asset_key == dg.AssetKey("sae_sweep")


def _materialize_all_layers(instance, config=None, defs=None):
    defs = defs or build_definitions()
    return materialize(
        defs,
        ["activations"],
        instance,
        tags={
            "dagster/asset_partition_range_start": str(LAYERS[0]),
            "dagster/asset_partition_range_end": str(LAYERS[-1]),
        },
        run_config={"ops": {"activations": {"config": config or {}}}},
    )


def test_backfill_of_every_layer_is_one_run_and_one_store(pipeline_file):
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_all_layers(instance)
    assert result.success
    mats = result.asset_materializations_for_node("activations")
    assert sorted(m.partition for m in mats) == sorted(str(x) for x in LAYERS)
    paths = {m.metadata["store_path"].value for m in mats}
    assert len(paths) == 1
    store = ActivationStore.open(paths.pop())
    assert store.layers == LAYERS and store.is_complete and store.n_imgs == 6
    assert len(instance.get_run_records()) == 1
    observations = [
        e.event_specific_data.asset_observation for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"
    ]
    assert sorted(o.partition for o in observations if o.asset_key == dg.AssetKey("activations")) == ["-1", "0"]
    # and the run observed the two sources it read
    assert sorted(o.asset_key.to_user_string() for o in observations if o.partition is None) == [
        "image_source",
        "vit_checkpoint",
    ]


def test_fanned_out_recording_writes_the_bytes_of_one_worker(pipeline_file, tmp_path):
    """n_workers_fanout = 2: two recording ops in one run fill disjoint block ranges of one store, byte-identical to
    saev_core recording the same config in one go."""
    import dataclasses

    from saev_core.pipeline.file import load_pipeline
    from saev_core.record import recording

    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_all_layers(instance, {"n_workers_fanout": 2})
    assert result.success
    parts = [
        e for e in result.all_events if e.event_type_value == "STEP_SUCCESS" and "record_activations_part" in e.step_key
    ]
    assert sorted(e.step_key for e in parts) == [
        "activations.record_activations_part[part_0]",
        "activations.record_activations_part[part_1]",
    ]
    (mat, *_) = result.asset_materializations_for_node("activations")
    fanned = ActivationStore.open(mat.metadata["store_path"].value)
    assert fanned.is_complete and fanned.layout.n_blocks >= 2 and mat.metadata["recording_ops"].value == 2

    cfg = load_pipeline(str(pipeline_file)).activations_for(tuple(LAYERS))
    one = recording.record_activations(
        dataclasses.replace(cfg, dump_to=str(tmp_path / "one_worker")), show_progress=False
    )
    assert os.path.basename(one.path) == os.path.basename(fanned.path)
    assert same_files(one.path, fanned.path)


def test_run_config_override_and_clear_failure(pipeline_file):
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_all_layers(instance, {"n_imgs": 2})
    store = ActivationStore.open(result.asset_materializations_for_node("activations")[0].metadata["store_path"].value)
    assert store.n_imgs == 2
    defs = build_definitions()
    job = defs.resolve_job_def("layer_assets")
    with pytest.raises(dg.DagsterUnknownPartitionError):  # a layer the pipeline does not record is no partition
        job.execute_in_process(instance=instance, partition_key="5", asset_selection=[dg.AssetKey("activations")])


def test_new_checkpoint_weights_request_new_activations(pipeline_file, own_ckpt, tmp_path):
    from saev_core.record.vit import save_random_weights

    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    observe_sources(defs, instance)
    assert _materialize_all_layers(instance, defs=defs).success
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    nothing = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert nothing.get_requested_partitions(dg.AssetKey("activations")) == set()

    weights = own_ckpt.split("/", 1)[1]
    save_random_weights("clip", "saev-tiny-clip", tmp_path / "new.pt", seed=5)
    os.replace(tmp_path / "new.pt", weights)
    observe_sources(defs, instance)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=nothing.cursor)
    assert after.get_requested_partitions(dg.AssetKey("activations")) == {"0", "-1"}


def test_a_backfill_before_any_observation_is_not_recorded_again_when_the_cron_observes(pipeline_file):
    """The recording run observes the sources it reads, so the first cron observation finds nothing new."""
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_all_layers(instance, defs=defs)
    assert result.success
    (mat, *_) = result.asset_materializations_for_node("activations")
    store = ActivationStore.open(mat.metadata["store_path"].value)
    assert mat.tags["dagster/input_data_version/vit_checkpoint"] == store.metadata["fingerprints"]["vit_ckpt"]
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    observe_sources(defs, instance)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert after.get_requested_partitions(dg.AssetKey("activations")) == set()


def test_a_fresh_demo_instance_observes_the_random_weights_it_makes(tmp_path, monkeypatch):
    """[demo] random_vit: the checkpoint does not exist until the pipeline makes it; observing the sources on a fresh
    instance (what the demo and the cron do first) makes it rather than failing."""
    from saev_core.record.vit import checkpoint_fingerprint

    write_images(tmp_path / "imgs", 4)
    made = tmp_path / "made" / "random.pt"
    path = tmp_path / "pipeline.toml"
    path.write_text("[demo]\nrandom_vit = true\n" + tiny_pipeline_text(tmp_path, f"saev-tiny-clip/{made}", LAYERS))
    monkeypatch.setenv("SAEV_PIPELINE", str(path))
    defs = build_definitions()
    events = observe_sources(defs, dg.DagsterInstance.ephemeral())
    assert made.is_file()
    versions = {e.asset_key.to_user_string(): e.tags["dagster/data_version"] for e in events}
    assert versions["vit_checkpoint"] == checkpoint_fingerprint("clip", f"saev-tiny-clip/{made}")


def test_observations_say_what_was_observed(pipeline_file, own_ckpt, tmp_path):
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    observe_sources(defs, instance)
    obs = {
        key: instance.fetch_observations(dg.AssetKey(key), limit=1).records[0].asset_observation.metadata
        for key in ("vit_checkpoint", "image_source")
    }
    weights = own_ckpt.split("/", 1)[1]
    assert obs["vit_checkpoint"]["path"].value == weights
    assert obs["vit_checkpoint"]["size_mb"].value == round(os.path.getsize(weights) / 1e6, 2)
    assert obs["image_source"]["root"].value == str(tmp_path / "imgs") and obs["image_source"]["n_images"].value == 6


def test_dagster_dev_serves_the_asset_graph(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = 3000 + os.getpid() % 2000
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen(
        dagster_dev_argv(port),
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "dagster dev did not start"
                time.sleep(1)
        query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
        nodes = None
        while nodes is None or not nodes.get("data", {}).get("assetNodes"):
            assert time.time() < deadline, nodes
            req = urllib.request.Request(f"{url}/graphql", data=query, headers={"Content-Type": "application/json"})
            nodes = json.load(urllib.request.urlopen(req, timeout=10))
            time.sleep(1)
        keys = {"/".join(n["assetKey"]["path"]) for n in nodes["data"]["assetNodes"]}
        assert {"activations", "vit_checkpoint", "image_source"} <= keys
    finally:
        stop_group(proc, wait_s=30)


def _materialize_sweep(instance, partition: str):
    return materialize(build_definitions(), ["sae_sweep"], instance, partition_key=partition, raise_on_error=False)


def test_sae_sweep_trains_the_pipelines_grid_on_the_recorded_layer(pipeline_file, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize_all_layers(instance).success
    result = _materialize_sweep(instance, "-1")
    assert result.success
    (mat,) = result.asset_materializations_for_node("sae_sweep")
    assert mat.partition == "-1" and mat.metadata["n_members"].value == 2
    assert "data:image/png;base64," in mat.metadata["plot: L0 vs NMSE (PNG)"].value
    csv = mat.metadata["sweep_csv"].value
    assert csv == str(tmp_path / "ckpts" / "layer_-1" / "sweep.csv")
    # Numbers the Plots tab charts, to 4 significant digits: per member, and the lowest held-out NMSE with its L0.
    import pandas as pd

    sweep = pd.read_csv(csv)
    for row in sweep.to_dict("records"):
        for name in ("nmse", "l0"):
            value = mat.metadata[f"{name}/{row['member_id']}"]
            assert isinstance(value, dg.FloatMetadataValue) and value.value == pytest.approx(row[name], rel=5e-4)
    best = sweep.loc[sweep["nmse"].idxmin()]
    assert mat.metadata["best_member"].value == best["member_id"]
    assert mat.metadata["best_nmse"].value == float(f"{best['nmse']:.4g}")
    assert mat.metadata["best_l0"].value == float(f"{best['l0']:.4g}")
    rows = sweep
    assert sorted(rows["lr"]) == [1e-3, 3e-3] and (rows["data.layer"] == -1).all()
    (check,) = result.get_asset_check_evaluations()
    assert check.partition == "-1"  # the check's result belongs to the layer it checked
    # The check carries its numbers, read back from sweep.csv here.
    assert check.metadata["worst_frac_dead"].value == pytest.approx(rows["frac_dead_train"].max())
    assert check.metadata["best_nmse"].value == pytest.approx(rows["nmse"].min())
    assert check.metadata["max_frac_dead"].value == 1.0
    # A tiny random ViT has little to find: the check may warn (losing to a control) but never errs or blocks.
    assert check.passed or check.severity == dg.AssetCheckSeverity.WARN


@pytest.mark.parametrize("max_frac_dead", [0.0])
def test_too_many_dead_latents_is_a_warning_that_blocks_nothing(pipeline_file):
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    assert _materialize_all_layers(instance, defs=defs).success
    result = materialize(defs, ["sae_sweep", "topk_visuals"], instance, partition_key="0")
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "sweep_is_healthy"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "are dead" in check.metadata["problems"].value and check.metadata["max_frac_dead"].value == 0.0
    assert result.asset_materializations_for_node("topk_visuals")  # a warning does not block


def test_an_error_blocks_the_visuals_and_names_its_bound(pipeline_file):
    pipeline_file.write_text(pipeline_file.read_text().replace("[checks]\n", "[checks]\nmax_nmse = 0.0\n"))
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    assert _materialize_all_layers(instance, defs=defs).success
    result = materialize(defs, ["sae_sweep", "topk_visuals"], instance, partition_key="0", raise_on_error=False)
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "sweep_is_healthy"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "above [checks] max_nmse 0" in check.metadata["problems"].value
    assert not result.asset_materializations_for_node("topk_visuals")  # blocked


def test_sae_sweep_before_activations_is_a_clear_failure(pipeline_file):
    result = _materialize_sweep(dg.DagsterInstance.ephemeral(), "0")
    assert not result.success
    assert "activations[0] has never been materialized" in str(result.failure_data_for_node("sae_sweep").error)


def test_a_user_error_in_an_asset_body_is_a_failure_whose_description_is_the_message(tmp_path):
    """Bad input raised anywhere in a body (here the pipeline file, read inside sae_sweep) fails the step with the
    message alone: no traceback of saev_core behind it."""
    from saev_core.errors import UserError
    from saev_core.pipeline.file import load_pipeline
    from saev_dagster.resources import SaevPipeline

    bad = tmp_path / "bad.toml"
    bad.write_text("[activations]\nvit_bathc_size = 3\n")
    with pytest.raises(UserError) as err:
        load_pipeline(str(bad))
    defs = build_definitions()  # the demo pipeline's graph, run against the bad file
    layer = defs.resolve_assets_def("sae_sweep").partitions_def.get_partition_keys()[0]
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=["sae_sweep"],
        partition_key=layer,
        resources={**defs.resources, "saev_pipeline": SaevPipeline(path=str(bad))},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    (failure,) = [e.step_failure_data for e in result.all_events if e.is_step_failure]
    assert failure.user_failure_data.description == str(err.value)
    assert failure.error.cls_name == "Failure" and failure.error.cause is None


def _step_failure(body) -> "dg.StepFailureData":
    from saev_dagster.failures import user_errors_fail_cleanly

    asset = dg.asset(name="toy")(user_errors_fail_cleanly(body))
    result = dg.materialize([asset], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    (failure,) = [e.step_failure_data for e in result.all_events if e.is_step_failure]
    return failure


def test_only_user_errors_become_clean_failures_from_plain_and_yielding_bodies():
    from saev_core.errors import UserError

    def plain(error: Exception):
        def body():
            raise error

        return body

    def yielding(error: Exception):
        def body():
            raise error
            yield dg.MaterializeResult()

        return body

    for wrap in (plain, yielding):
        failure = _step_failure(wrap(UserError("--lr -1: must be positive.")))
        assert failure.user_failure_data.description == "--lr -1: must be positive.", wrap
        failure = _step_failure(wrap(ZeroDivisionError("a bug")))
        assert failure.user_failure_data is None, wrap
        assert failure.error.cause.cls_name == "ZeroDivisionError" and failure.error.cause.stack, wrap  # its traceback


def test_every_body_of_the_code_location_turns_user_errors_into_clean_failures(pipeline_file):
    defs = build_definitions()
    bodies = {}
    for a in defs.assets:
        if isinstance(a, dg.SourceAsset):
            bodies[a.key.to_user_string()] = a.observe_fn
        else:
            bodies.update({op.name: op.compute_fn.decorated_fn for op in a.node_def.iterate_op_defs()})
    for check in defs.asset_checks:
        bodies.update({op.name: op.compute_fn.decorated_fn for op in check.node_def.iterate_op_defs()})
    assert {"sae_checkpoints", "dropped_sae_visuals", "activations_store", "topk_visuals_visuals_complete"} <= set(
        bodies
    )
    assert [name for name, fn in bodies.items() if not getattr(fn, "fails_cleanly", False)] == []


def test_topk_visuals_renders_every_member_and_its_check_sees_a_deleted_png(pipeline_file, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    assert _materialize_all_layers(instance, defs=defs).success
    assert _materialize_sweep(instance, "-1").success
    result = materialize(defs, ["topk_visuals"], instance, partition_key="-1")
    assert result.success
    (mat,) = result.asset_materializations_for_node("topk_visuals")
    assert mat.metadata["n_members"].value == 2 and mat.metadata["n_latents"].value > 0
    assert mat.metadata["n_heatmaps"].value >= mat.metadata["n_latents"].value  # heatmaps, not distinct images
    galleries = [v for k, v in mat.metadata.items() if k.startswith("gallery/")]
    assert len(galleries) == 2 and all(
        isinstance(g, dg.PathMetadataValue) and os.path.isfile(g.value) for g in galleries
    )
    previews = [v.value for k, v in mat.metadata.items() if k.startswith("preview: top images")]
    assert len(previews) == 2 and all("data:image/png;base64," in v for v in previews)
    commands = [v.value for k, v in mat.metadata.items() if k.startswith("explore/")]
    assert len(commands) == 2 and all(c.startswith("python -m saev_core explore --visuals ") for c in commands)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata

    # One heatmap gone: running the check alone now fails and names the file.
    victim = next(p for p in sorted((tmp_path / "visuals" / "layer_-1").rglob("*.png")) if "neurons" in str(p))
    victim.unlink()
    job = defs.resolve_job_def("layer_assets")
    check_key = dg.AssetCheckKey(dg.AssetKey("topk_visuals"), "visuals_complete")
    only_check = job.get_subset(asset_selection=set(), asset_check_selection={check_key}).execute_in_process(
        instance=instance, partition_key="-1", raise_on_error=False, resources=defs.resources
    )
    (check,) = only_check.get_asset_check_evaluations()
    assert not check.passed and str(victim) in check.metadata["problems"].value


def test_sweep_report_has_every_member_of_every_layer_and_a_pca_baseline(pipeline_file, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    assert _materialize_all_layers(instance, defs=defs).success
    for layer in ("0", "-1"):
        assert _materialize_sweep(instance, layer).success
    result = materialize(defs, ["sweep_report"], instance)
    (mat,) = result.asset_materializations_for_node("sweep_report")
    records = mat.metadata["members"].value.records
    assert sorted((r.data["layer"], r.data["lr"]) for r in records) == [(-1, 1e-3), (-1, 3e-3), (0, 1e-3), (0, 3e-3)]
    assert sum(r.data["chosen"] for r in records) == 2  # one chosen member per layer
    assert all(0 < r.data["pca_nmse_at_l0"] <= 1.0 + 1e-9 for r in records)
    report = tmp_path / "ckpts" / "report.md"
    assert mat.metadata["report"].value == str(report) and report.is_file()
    assert (tmp_path / "ckpts" / "report_layer_0.png").is_file()
    assert "data:image/png;base64," in mat.metadata["l0_vs_nmse_layer_-1"].value
    assert not any("splice_cos" in r.data for r in records)  # only when the pipeline asks

    # [report] splice = true: every member gets its splice-in columns.
    pipeline_file.write_text(pipeline_file.read_text() + "\n[report]\nsplice = true\nsplice_max_images = 4\n")
    defs = build_definitions()
    (mat,) = materialize(defs, ["sweep_report"], instance).asset_materializations_for_node("sweep_report")
    records = mat.metadata["members"].value.records
    assert len(records) == 4 and all(0.0 < r.data["splice_cos"] <= 1.0 + 1e-9 for r in records)
    # Block 0's patches reach the pooled CLS token through block 1, so splicing there is measurable.
    assert all(r.data["splice_gap_recovered"] is not None for r in records if r.data["layer"] == 0)
    # Block -1 is the last: its patches never reach the pooled CLS, zeroing them changes nothing, the gap is 0/0.
    assert all(r.data["splice_gap_recovered"] is None for r in records if r.data["layer"] == -1)
    assert "splice_gap_recovered" in report.read_text()


def test_a_bad_pipeline_file_fails_the_load_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[activations]\nvit_layers = [-2]\nvit_bathc_size = 3\n")
    with pytest.raises(PipelineFileError, match=r"vit_bathc_size.*bad.toml|bad.toml.*vit_bathc_size"):
        build_definitions(str(bad))


JOB_RUNS = """query JobRuns($selector: PipelineSelector!) {
  pipelineOrError(params: $selector) {
    __typename
    ... on Pipeline { runs { runId repositoryOrigin { repositoryLocationName repositoryName } } }
  }
}"""


def is_progress_bar(line: str) -> bool:
    """A tqdm bar (its \\r-separated updates end in one line): "desc:  45%|####  | 9/20 [00:01<00:01, ...]"."""
    return bool(re.search(r"\d+%\|.*\| *[\d.]+k?/[\d.]+k? \[", line))


def test_the_demo_prints_one_line_per_stage_and_its_runs_are_the_code_locations(pipeline_file, tmp_path):
    """The demo as a user runs it (its own process; the terminal is stdout and stderr together): every stage in one
    line with its time, the galleries, the report and the UI command, fewer than 40 lines besides progress bars;
    the whole graph materialized with its checks; and every run belongs to workspace.yaml's code location, so the
    Jobs page lists it (asked through GraphQL as the UI asks)."""
    import yaml

    from saev_dagster.dagster_private import WorkspaceFileTarget, WorkspaceProcessContext

    home = tmp_path / "home"
    command = [sys.executable, "-m", "saev_dagster.demo", "--pipeline", str(pipeline_file), "--dagster-home", str(home)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    text_lines = [line for line in lines if not is_progress_bar(line)]
    assert len(text_lines) < 40, "\n".join(text_lines)
    assert any(is_progress_bar(line) for line in lines)  # the steps draw their bars on the demo's terminal
    out = done.stdout.splitlines()
    stages = {m[1]: line for line in out if (m := re.match(r"^(\S.*?) +[\d.]+ s  ", line))}
    layers = [str(x) for x in LAYERS]
    assert set(stages) == {
        "sources",
        f"activations[{', '.join(layers)}]",
        *(f"{asset}[{layer}]" for layer in layers for asset in ("sae_sweep", "topk_visuals")),
        "sweep_report",
        "dropped_sae_visuals",
    }
    assert (
        "img/s" in stages[f"activations[{', '.join(layers)}]"] and "MB" in stages[f"activations[{', '.join(layers)}]"]
    )
    assert all(
        "lowest NMSE" in stages[f"sae_sweep[{layer}]"] and "L0" in stages[f"sae_sweep[{layer}]"] for layer in layers
    )
    galleries = [line.split(": ", 1)[1] for line in out if line.strip().startswith("gallery (")]
    assert len(galleries) == 2 * len(LAYERS) and all(os.path.isfile(g) for g in galleries)  # members = "all"
    explorers = [line.split(": ", 1)[1] for line in out if line.strip().startswith("explorer app (")]
    assert len(explorers) == len(galleries) and all(
        e.startswith(f"{sys.executable} -m saev_core explore --visuals ") for e in explorers
    )
    assert stages["sweep_report"].endswith(f"report: {tmp_path / 'ckpts' / 'report.md'}")
    assert out[-1].startswith("UI: ") and "dagster dev -w" in out[-1]
    log_file = out[-2].rsplit(" ", 1)[1]
    assert "sae_sweep: step 0" in open(log_file).read()  # Dagster's INFO log went to the file, not the terminal

    instance = dg.DagsterInstance.from_config(str(home))
    for key in ("activations", "sae_sweep", "topk_visuals", "sweep_report"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    checks = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("topk_visuals"), "visuals_complete"), limit=10
    )
    assert len(checks) == len(LAYERS)
    runs = [r.dagster_run for r in instance.get_run_records()]
    assert all(r.is_success for r in runs)
    recording = [r for r in runs if r.asset_selection == {dg.AssetKey("activations")}]
    assert len(recording) == 1  # every layer in ONE run (one ViT pass)
    # activations, ONE run per layer (its sweep and visuals), report, the dropped checkpoint's visuals; observing
    # took no run
    assert len(runs) == 1 + len(LAYERS) + 1 + 1
    assert instance.get_dynamic_partitions("sae_files") == [os.path.basename(stages["dropped_sae_visuals"].split()[3])]

    # The code location that `dagster dev -w workspace.yaml` serves, as Dagster loads it from the workspace file.
    from dagster_graphql.test.utils import execute_dagster_graphql

    with open(os.path.join(REPO, "workspace.yaml")) as f:
        (entry,) = yaml.safe_load(f)["load_from"]
    listed = set()
    with WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[os.path.join(REPO, "workspace.yaml")])) as ws:
        context = ws.create_request_context()
        (location,) = context.code_location_names
        assert location.startswith(entry["python_module"]["module_name"])
        assert {
            (r.remote_job_origin.location_name, r.remote_job_origin.repository_origin.repository_name) for r in runs
        } == {(location, "__repository__")}
        # the label the UI filters a location's runs by (a tag Dagster stores beside the run's own tags)
        labelled = instance.get_runs(dg.RunsFilter(tags={".dagster/repository": f"__repository__@{location}"}))
        assert {r.run_id for r in labelled} == {r.run_id for r in runs}
        for job in {r.job_name for r in runs}:
            selector = {"repositoryLocationName": location, "repositoryName": "__repository__", "pipelineName": job}
            result = execute_dagster_graphql(context, JOB_RUNS, {"selector": selector})
            assert not result.errors, result.errors
            job_runs = result.data["pipelineOrError"]["runs"]
            assert {o["repositoryOrigin"]["repositoryLocationName"] for o in job_runs} == {location}
            listed |= {o["runId"] for o in job_runs}
    assert listed == {r.run_id for r in runs}  # each run on its job's page of the code location


def test_dropped_sae_files_get_their_own_visuals_and_only_those(pipeline_file, tmp_path):
    from saev_core import nn

    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions()
    assert _materialize_all_layers(instance, defs=defs).success
    assert _materialize_sweep(instance, "-1").success
    trained = sorted((tmp_path / "ckpts" / "layer_-1").glob("*/sae.pt"))[0]
    shutil.copy(trained, tmp_path / "watch" / "a.pt")
    observe_sources(defs, instance)
    assert instance.get_dynamic_partitions("sae_files") == ["a.pt"]
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    result = materialize(defs, ["dropped_sae_visuals"], instance, partition_key="a.pt")
    (mat,) = result.asset_materializations_for_node("dropped_sae_visuals")
    assert mat.metadata["gallery"].value == str(tmp_path / "visuals" / "dropped" / "a.pt" / "index.html")
    settled = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)

    # A new file requests its own visuals and nothing else.
    shutil.copy(trained, tmp_path / "watch" / "b.pt")
    observe_sources(defs, instance)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=settled.cursor)
    assert after.get_requested_partitions(dg.AssetKey("dropped_sae_visuals")) == {"b.pt"}
    for key in ("activations", "sae_sweep", "topk_visuals"):
        assert after.get_requested_partitions(dg.AssetKey(key)) == set(), key

    # A file without provenance (as saev 0.1.0 writes them) fails with the sidecar instruction.
    bare = nn.load(trained)
    bare.provenance = {}
    nn.dump(tmp_path / "watch" / "old.pt", bare)
    observe_sources(defs, instance)
    failed = materialize(defs, ["dropped_sae_visuals"], instance, partition_key="old.pt", raise_on_error=False)
    assert not failed.success
    assert "old.pt.provenance.json" in str(failed.failure_data_for_node("dropped_sae_visuals").error)


def test_a_changed_checkpoint_requests_the_whole_graph_with_activations_in_one_run(pipeline_file, own_ckpt, tmp_path):
    from saev_core.record.vit import save_random_weights
    from saev_dagster import demo

    home = tmp_path / "home"
    assert demo.main(["--pipeline", str(pipeline_file), "--dagster-home", str(home)]) == 0
    instance = dg.DagsterInstance.from_config(str(home))
    defs = build_definitions()
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert quiet.total_requested == 0

    save_random_weights("clip", "saev-tiny-clip", tmp_path / "new.pt", seed=9)
    os.replace(tmp_path / "new.pt", own_ckpt.split("/", 1)[1])
    observe_sources(defs, instance)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    every_layer = {str(x) for x in LAYERS}
    for key in ("activations", "sae_sweep", "topk_visuals"):
        assert after.get_requested_partitions(dg.AssetKey(key)) == every_layer, key
    # The sensor emits the multi-partition requests as one backfill; the backfill daemon runs activations by its
    # single-run policy, so both layers are recorded in ONE run (one ViT pass).
    from dagster._core.definitions.automation_tick_evaluation_context import build_run_requests

    from saev_dagster.automation import automation_sensor

    requests = build_run_requests(
        after._requested_subsets, defs.resolve_asset_graph(), None, emit_backfills=automation_sensor.emit_backfills
    )
    with_activations = [
        r
        for r in requests
        if r.requires_backfill_daemon() and dg.AssetKey("activations") in r.asset_graph_subset.asset_keys
    ]
    assert len(with_activations) == 1
    assert defs.resolve_assets_def("activations").backfill_policy == dg.BackfillPolicy.single_run()

    # The report waits for its upstream: once the layers are done, it is requested too.
    assert after.get_num_requested(dg.AssetKey("sweep_report")) == 0
    job = defs.resolve_job_def("layer_assets")
    tags = {"dagster/asset_partition_range_start": str(LAYERS[0]), "dagster/asset_partition_range_end": str(LAYERS[-1])}
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("activations")], tags=tags).success
    for layer in every_layer:
        assert job.execute_in_process(
            instance=instance,
            partition_key=layer,
            asset_selection=[dg.AssetKey("sae_sweep"), dg.AssetKey("topk_visuals")],
        ).success
    later = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
    assert later.get_num_requested(dg.AssetKey("sweep_report")) == 1


def test_activations_check_catches_a_store_that_does_not_match_the_vit(pipeline_file):
    import numpy as np

    from saev_core.pipeline.file import load_pipeline
    from saev_core.record import verify

    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_all_layers(instance)
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "activations_match_vit"]
    assert check.passed, check.metadata
    path = result.asset_materializations_for_node("activations")[0].metadata["store_path"].value
    cfg = load_pipeline().activations
    store = ActivationStore.open(path, mode="r+")
    arr = store.array(-1)
    arr[:] = np.asarray(arr[:]) * 1.01  # as if recorded from other weights
    problems = verify.store_problems(cfg, path, n_samples=6)
    assert len(problems) == 1 and problems[0].startswith("layer -1:")


def test_the_instance_template_limits_the_gpu_pool_that_the_heavy_assets_use(tmp_path):
    shutil.copy(
        os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "deploy", "dagster.yaml"), tmp_path
    )
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    defs = build_definitions()
    pools = {
        key: defs.resolve_assets_def(key).get_op_def_for_asset_key(dg.AssetKey(key)).pool
        for key in ("sae_sweep", "topk_visuals", "sweep_report")
    }
    assert pools == {"sae_sweep": "gpu", "topk_visuals": "gpu", "sweep_report": None}
    # activations is a graph: its recording ops (the ViT passes) take the pool, planning and checking do not
    recording_ops = {op.name: op.pool for op in defs.resolve_assets_def("activations").node_def.iterate_op_defs()}
    assert recording_ops == {"activations_store": None, "record_activations_part": "gpu", "activations_verify": None}


CRON_STRINGS = [
    "*/5 * * * *",
    "0 0 * * *",
    "@daily",
    "@hourly",
    "0 9-17 * * mon-fri",
    "15,45 * 1 jan,jul sun",
    "0 0 * * 7",
    "5-1 * * * *",
    "*/5 1-10/2 * * *",
    "*/0 * * * *",
    "60 * * * *",
    "* * * *",
    "* * * * * *",
    "every 5 minutes",
    "0 24 * * *",
    "0 0 0 * *",
    "0 0 * 13 *",
    "a * * * *",
    "* * * * 8",
    "1-2-3 * * * *",
    "",
    "@reboot",
    "0 0 30 feb *",
]


@pytest.mark.parametrize("cron", CRON_STRINGS)
def test_the_pipeline_files_cron_check_agrees_with_dagsters_parser(cron):
    """saev_core reads no Dagster: its cron check is its own, so Dagster's parser is the reference."""
    from dagster._utils.schedules import is_valid_cron_string

    from saev_core.errors import UserError
    from saev_core.pipeline.file import check_cron

    try:
        check_cron(cron, "automation.observe_cron in x.toml")
        ours = True
    except UserError as err:
        assert "automation.observe_cron in x.toml" in str(err) and repr(cron) in str(err)
        ours = False
    assert ours == is_valid_cron_string(cron)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s[: s.index("[activations]")] + s[s.index("[train]") :], "[activations]"),
        (lambda s: s + '\n[automation]\nobserve_cron = "every 5 minutes"\n', "automation.observe_cron"),
        (lambda s: s + '\n[automation]\nobserve_cron = "*/5 * * *"\n', "automation.observe_cron"),
        (lambda s: s.replace('folder = "', 'folder = "/nowhere/'), "watch.folder"),
        (lambda s: "report = 5\n" + s, "[report]"),
    ],
    ids=["no-activations", "cron-words", "cron-four-fields", "watch-folder-missing", "report-not-a-table"],
)
def test_the_dagster_load_refuses_a_bad_table_naming_file_and_key(pipeline_file, edit, named):
    """Through the code location's own load: one PipelineFileError naming the file and the key."""
    text = edit(pipeline_file.read_text())
    bad = pipeline_file.parent / "bad.toml"
    bad.write_text(text)
    with pytest.raises(PipelineFileError) as err:
        build_definitions(str(bad))
    assert str(bad) in str(err.value) and named in str(err.value), str(err.value)


def _plant_patch_labels(store_path: str) -> None:
    """Per-patch labels written into a recorded store (stand-in until recording from segmentation masks lands):
    the layout ``ActivationStore.patch_labels`` reads."""
    import numpy as np
    import zarr

    store = ActivationStore.open(store_path)
    n_patches = store.n_tokens - int(store.metadata["cls_token"])
    labels = np.random.default_rng(0).integers(0, 3, size=(store.n_imgs, n_patches))
    arr = zarr.open_group(store_path, mode="r+").create_array("patch_labels", shape=labels.shape, dtype="int16")
    arr[:] = labels
    arr.attrs["class_names"] = ["unlabelled", "a", "b"]


def test_probe_metrics_exists_with_a_probe_table_and_notes_a_store_without_labels(pipeline_file, tmp_path):
    assert "probe_metrics" not in {a.key.to_user_string() for a in build_definitions().assets}
    pipeline_file.write_text(pipeline_file.read_text() + '\n[probe]\nmembers = "best"\nk = 5\ndevice = "cpu"\n')
    defs = build_definitions()
    (asset,) = [a for a in defs.assets if a.key.to_user_string() == "probe_metrics"]
    assert asset.op.compute_fn.decorated_fn.fails_cleanly  # a UserError inside is a clean failure
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize_all_layers(instance, defs=defs).success
    assert _materialize_sweep(instance, "-1").success
    (mat,) = materialize(defs, ["probe_metrics"], instance, partition_key="-1").asset_materializations_for_node(
        "probe_metrics"
    )
    assert mat.metadata["n_members"].value == 0 and "data:seg-folder-dataset" in mat.metadata["note"].value

    store_path = next(str(p) for p in (tmp_path / "acts").iterdir() if p.is_dir())
    _plant_patch_labels(store_path)
    (mat,) = materialize(defs, ["probe_metrics"], instance, partition_key="-1").asset_materializations_for_node(
        "probe_metrics"
    )
    assert mat.metadata["n_members"].value == 1 and 0.0 <= mat.metadata["map"].value <= 1.0
    path = next(v.value for k, v in mat.metadata.items() if k.startswith("probe_json_"))
    doc = json.loads(open(path).read())
    assert doc["map"] == pytest.approx(mat.metadata["map"].value) and set(doc["controls"]) == {
        "pca",
        "random",
        "kmeans",
    }
    assert path.startswith(str(tmp_path / "ckpts" / "layer_-1"))

    # The visuals come after the probes, and the probed member's gallery shows them.
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("topk_visuals")).parent_keys}
    assert parents == {"sae_sweep", "probe_metrics"}
    (mat,) = materialize(defs, ["topk_visuals"], instance, partition_key="-1").asset_materializations_for_node(
        "topk_visuals"
    )
    member = os.path.basename(os.path.dirname(os.path.dirname(path)))
    with open(mat.metadata[f"gallery/{member}"].value) as f:
        assert 'id="probe-classes"' in f.read()
