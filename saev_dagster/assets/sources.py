"""Observable sources: the ViT checkpoint and the image set. Their data versions are the same content
fingerprints that key the activation store, so new weights or new images make downstream assets stale; each
observation also says what was observed (file, size, time; folder, image count)."""

import os

import dagster as dg

from saev_dagster.assets.common import source_asset_kwargs
from saev_dagster.dagster_private import DATA_VERSION_TAG
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.resources import SaevPipeline

OBSERVE_JOB = "in_process_observation_job"


def build_sources(observe_cron: str) -> list[dg.SourceAsset]:
    """The two sources, observed on the pipeline's [automation] observe_cron."""

    @dg.observable_source_asset(
        name="vit_checkpoint",
        **source_asset_kwargs("recording", {"pytorch"}, observe_cron),
        description="The ViT checkpoint named in the pipeline file; data version = content fingerprint of the file.",
    )
    @user_errors_fail_cleanly
    def vit_checkpoint(saev_pipeline: SaevPipeline) -> dg.ObserveResult:
        return observe_checkpoint(saev_pipeline.load())

    @dg.observable_source_asset(
        name="image_source",
        **source_asset_kwargs("recording", {"folder"}, observe_cron),
        description="The image set named in the pipeline file; data version = fingerprint of (path, size, mtime).",
    )
    @user_errors_fail_cleanly
    def image_source(saev_pipeline: SaevPipeline) -> dg.ObserveResult:
        return observe_images(saev_pipeline.load())

    return [vit_checkpoint, image_source]


def observe_checkpoint(pipe) -> dg.ObserveResult:
    """vit_checkpoint's data version (the checkpoint's content fingerprint) and what was observed. With [demo]
    random_vit the pipeline makes its checkpoint: a fresh instance's first observation creates the file."""
    from saev_core.pipeline import stages

    stages.prepare_demo_checkpoint(pipe)
    version = pipe.checkpoint_fingerprint()
    path = pipe.checkpoint_file()
    metadata = {"vit_ckpt": pipe.activations.vit_ckpt}
    if path is not None and os.path.isfile(path):
        st = os.stat(path)
        metadata.update(
            {
                "path": dg.MetadataValue.path(path),
                "size_mb": round(st.st_size / 1e6, 2),
                "modified": dg.MetadataValue.timestamp(st.st_mtime),
            }
        )
    return dg.ObserveResult(data_version=dg.DataVersion(version), metadata=metadata)


def observe_images(pipe) -> dg.ObserveResult:
    """image_source's data version (fingerprint of the image list) and what was observed."""
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


def as_observation(key: str, result: dg.ObserveResult) -> dg.AssetObservation:
    """An observation a run logs of a source it read: the same data version tag an observation run writes."""
    return dg.AssetObservation(
        asset_key=key, metadata=result.metadata, tags={DATA_VERSION_TAG: result.data_version.value}
    )


def observe_sources(
    defs: dg.Definitions, instance: dg.DagsterInstance, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    """Observe every source of a code location in one in-process run, with its resources (as a cron tick would).
    Dagster's own ``observe`` is private; this is what it does, in public API: an asset job over the sources."""
    sources = [a for a in defs.assets if isinstance(a, dg.SourceAsset)]
    job = dg.define_asset_job(OBSERVE_JOB, selection=dg.AssetSelection.all(include_sources=True))
    observing = dg.Definitions(assets=sources, jobs=[job], resources=defs.resources)
    return observing.resolve_job_def(OBSERVE_JOB).execute_in_process(instance=instance, raise_on_error=raise_on_error)
