"""The observation sensor: an unchanged source costs a stat (no hash, no run, no event), a replaced checkpoint is
hashed once and reported as a runless observation that the automation reads like an observation run's."""

import os
import shutil

import dagster as dg
import pytest

from saev_dagster.definitions import build_definitions
from saev_dagster.observation import SENSOR
from tests.helpers import tiny_pipeline_text, write_images

LAYERS = [0, -1]


@pytest.fixture
def pipeline_file(tmp_path, tiny_clip_ckpt, monkeypatch):
    shutil.copy(tiny_clip_ckpt.split("/", 1)[1], tmp_path / "tiny.pt")
    write_images(tmp_path / "imgs", 6)
    (tmp_path / "watch").mkdir()
    path = tmp_path / "pipeline.toml"
    path.write_text(
        tiny_pipeline_text(tmp_path, f"saev-tiny-clip/{tmp_path / 'tiny.pt'}", LAYERS)
        + f'[watch]\nfolder = "{tmp_path / "watch"}"\n'
    )
    monkeypatch.setenv("SAEV_PIPELINE", str(path))
    return path


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Every checkpoint hash, as the paths hashed."""
    from saev_core.record import vit

    hashed, real = [], vit.checkpoint_fingerprint

    def counting(family, ckpt):
        hashed.append(ckpt)
        return real(family, ckpt)

    monkeypatch.setattr(vit, "checkpoint_fingerprint", counting)
    return hashed


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None = None):
    """One evaluation of the observation sensor, its result applied to the instance as the sensor daemon does."""
    sensor = defs.resolve_sensor_def(SENSOR)
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources)
    result = sensor(context)
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
    return result


def observations(instance: dg.DagsterInstance, key: str) -> list:
    return instance.fetch_observations(dg.AssetKey(key), limit=100).records


def test_an_unchanged_source_observed_n_times_adds_no_run_and_is_hashed_once(pipeline_file, tmp_path, hashes):
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    first = tick(defs, instance)
    assert {e.asset_key.to_user_string() for e in first.asset_events} == {"vit_checkpoint", "image_source"}
    for _ in range(5):  # a fresh cursor each time: every evaluation looks, as one per cron tick would
        quiet = tick(defs, instance)
        assert quiet.asset_events == [] and quiet.skip_reason.skip_message == "no source changed (stat only)"
    assert hashes == [f"saev-tiny-clip/{tmp_path / 'tiny.pt'}"]
    assert instance.get_runs_count() == 0
    assert len(observations(instance, "vit_checkpoint")) == 1 and len(observations(instance, "image_source")) == 1

    # Within one cron tick the sensor does not even stat: its cursor is the tick it last looked at.
    assert isinstance(tick(defs, instance, cursor=first.cursor), dg.SkipReason)


def test_a_replaced_checkpoint_is_hashed_reported_and_requests_the_activations(pipeline_file, tmp_path, hashes):
    from saev_core.record.vit import checkpoint_fingerprint, save_random_weights

    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    tick(defs, instance)
    job = defs.resolve_job_def("layer_assets")
    tags = {"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "-1"}
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("activations")], tags=tags).success
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert quiet.get_requested_partitions(dg.AssetKey("activations")) == set()
    n_hashed = len(hashes)

    # Same size, same mtime, new bytes and a new inode: what a user's `cp new.pt tiny.pt && touch -r` leaves.
    weights = tmp_path / "tiny.pt"
    before = os.stat(weights)
    save_random_weights("clip", "saev-tiny-clip", tmp_path / "new.pt", seed=5)
    os.utime(tmp_path / "new.pt", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp_path / "new.pt", weights)
    (event,) = tick(defs, instance).asset_events
    assert event.asset_key == dg.AssetKey("vit_checkpoint")
    assert event.tags["dagster/data_version"] == checkpoint_fingerprint("clip", f"saev-tiny-clip/{weights}")
    assert len(hashes) == n_hashed + 2  # the sensor's hash, and the reference above
    assert instance.get_runs_count() == 1  # the recording run; observing added none
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
    assert after.get_requested_partitions(dg.AssetKey("activations")) == {"0", "-1"}


def test_a_file_dropped_in_the_watched_folder_becomes_a_partition_once(pipeline_file, tmp_path):
    defs = build_definitions()
    instance = dg.DagsterInstance.ephemeral()
    tick(defs, instance)
    (tmp_path / "watch" / "a.pt").write_bytes(b"not read by the observation")
    (event,) = tick(defs, instance).asset_events
    assert (event.asset_key, event.partition) == (dg.AssetKey("sae_checkpoints"), "a.pt")
    assert instance.get_dynamic_partitions("sae_files") == ["a.pt"]
    assert tick(defs, instance).asset_events == []
    assert instance.get_runs_count() == 0
