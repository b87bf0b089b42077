"""Observable sources: the ViT checkpoint and the image set. Their data versions are the same content
fingerprints that key the activation store, so new weights or new images make downstream assets stale; each
observation also says what was observed (file, size, time; folder, image count).

Observing costs a ``stat`` when nothing changed: the checkpoint is hashed only when its (size, mtime, inode)
differs from the one the latest observation recorded (the instance's event log is the cache), and
``changed_observations`` returns only the observations whose data version moved. The observation sensor
(``saev_dagster.observation``) reports those as runless events, so a quiet source adds nothing."""

import os

import dagster as dg

from saev_dagster.assets.common import source_asset_kwargs
from saev_dagster.dagster_private import DATA_VERSION_TAG
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.resources import SaevPipeline

SOURCES = ("vit_checkpoint", "image_source")


def build_sources() -> list[dg.SourceAsset]:
    """The two sources; the observation sensor observes them (the UI's "Observe sources" runs these bodies)."""

    @dg.observable_source_asset(
        name="vit_checkpoint",
        **source_asset_kwargs("recording", {"pytorch"}),
        description="The ViT checkpoint named in the pipeline file; data version = content fingerprint of the file "
        "(hashed only when its size, mtime or inode changed).",
    )
    @user_errors_fail_cleanly
    def vit_checkpoint(context, saev_pipeline: SaevPipeline) -> dg.ObserveResult:
        return observe_checkpoint(saev_pipeline.load(), context.instance)

    @dg.observable_source_asset(
        name="image_source",
        **source_asset_kwargs("recording", {"folder"}),
        description="The image set named in the pipeline file; data version = fingerprint of (path, size, mtime).",
    )
    @user_errors_fail_cleanly
    def image_source(saev_pipeline: SaevPipeline) -> dg.ObserveResult:
        return observe_images(saev_pipeline.load())

    return [vit_checkpoint, image_source]


def latest_observation(instance: dg.DagsterInstance | None, key: str, partition: str | None = None):
    """(data version, metadata values) of the latest observation of key[partition]; (None, {}) when there is none."""
    if instance is None:
        return None, {}
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records:
        return None, {}
    obs = records[0].asset_observation
    return (obs.tags or {}).get(DATA_VERSION_TAG), {k: v.value for k, v in obs.metadata.items()}


def stat_signature(path: str) -> str:
    """What decides whether a file must be hashed again: its size, mtime (ns) and inode (a replaced file has a new
    inode even when size and mtime were copied)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def observe_checkpoint(pipe, instance: dg.DagsterInstance | None = None) -> dg.ObserveResult:
    """vit_checkpoint's data version (the checkpoint's content fingerprint) and what was observed. The file is hashed
    only when its stat signature differs from the latest observation's (``instance`` None: always). With [demo]
    random_vit the pipeline makes its checkpoint: a fresh instance's first observation creates the file."""
    path = pipe.checkpoint_file()
    if pipe.demo.random_vit and path is not None and not os.path.exists(path):
        from saev_core.pipeline import stages

        stages.prepare_demo_checkpoint(pipe)
    metadata = {"vit_ckpt": pipe.activations.vit_ckpt}
    if path is None or not os.path.isfile(path):
        return dg.ObserveResult(data_version=dg.DataVersion(pipe.checkpoint_fingerprint()), metadata=metadata)
    signature = stat_signature(path)
    version, last = latest_observation(instance, "vit_checkpoint")
    if version is None or last.get("stat") != signature or last.get("path") != path:
        version = pipe.checkpoint_fingerprint()
    st = os.stat(path)
    metadata.update(
        {
            "path": dg.MetadataValue.path(path),
            "size_mb": round(st.st_size / 1e6, 2),
            "modified": dg.MetadataValue.timestamp(st.st_mtime),
            "stat": signature,
        }
    )
    return dg.ObserveResult(data_version=dg.DataVersion(version), metadata=metadata)


def observe_images(pipe) -> dg.ObserveResult:
    """image_source's data version (fingerprint of the image list: stats, no reads) and what was observed."""
    from saev_core.record import images

    source = pipe.image_source()
    return dg.ObserveResult(
        data_version=dg.DataVersion(images.image_list_fingerprint(source)),
        metadata={
            "root": dg.MetadataValue.path(source.root),
            "n_images": len(source),
            "n_classes": len(source.class_names),
        },
    )


def as_observation(key: str, result: dg.ObserveResult, partition: str | None = None) -> dg.AssetObservation:
    """An observation as an event (logged by a run that read the source, or reported by the sensor without a run):
    the same data version tag an observation run writes."""
    return dg.AssetObservation(
        asset_key=key, partition=partition, metadata=result.metadata, tags={DATA_VERSION_TAG: result.data_version.value}
    )


def changed_observations(pipe, instance: dg.DagsterInstance) -> list[dg.AssetObservation]:
    """The observations of the two sources whose data version differs from their latest one (none when nothing
    changed)."""
    events = []
    for key, result in (("vit_checkpoint", observe_checkpoint(pipe, instance)), ("image_source", observe_images(pipe))):
        if latest_observation(instance, key)[0] != result.data_version.value:
            events.append(as_observation(key, result))
    return events
