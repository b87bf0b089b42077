"""Observable sources: the ViT checkpoint and the image set. Their data versions are the same content
fingerprints that key the activation store, so new weights or new images make downstream assets stale."""

import dagster as dg

OBSERVE_EVERY = "*/5 * * * *"


@dg.observable_source_asset(
    description="The ViT checkpoint named in the pipeline file; data version = content fingerprint of the file.",
    automation_condition=dg.AutomationCondition.cron_tick_passed(OBSERVE_EVERY),
)
def vit_checkpoint() -> dg.DataVersion:
    return _data_version("checkpoint_fingerprint")


@dg.observable_source_asset(
    description="The image set named in the pipeline file; data version = fingerprint of (path, size, mtime).",
    automation_condition=dg.AutomationCondition.cron_tick_passed(OBSERVE_EVERY),
)
def image_source() -> dg.DataVersion:
    return _data_version("images_fingerprint")


def _data_version(fingerprint: str) -> dg.DataVersion:
    """The pipeline file's fingerprint (a saev_core.pipeline.Pipeline method name) as a data version; bad input is
    a clear Dagster failure, not a traceback."""
    from saev_core import pipeline
    from saev_core.errors import UserError

    try:
        return dg.DataVersion(getattr(pipeline.load_pipeline(), fingerprint)())
    except UserError as err:
        raise dg.Failure(description=str(err)) from None
