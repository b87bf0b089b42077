"""Observable sources: the ViT checkpoint and the image set. Their data versions are the same content
fingerprints that key the activation store, so new weights or new images make downstream assets stale."""

import dagster as dg

OBSERVE_EVERY = "*/5 * * * *"


@dg.observable_source_asset(
    description="The ViT checkpoint named in the pipeline file; data version = content fingerprint of the file.",
    automation_condition=dg.AutomationCondition.cron_tick_passed(OBSERVE_EVERY),
)
def vit_checkpoint() -> dg.DataVersion:
    from saev_core import pipeline
    from saev_core.errors import UserError

    try:
        return dg.DataVersion(pipeline.load_pipeline().checkpoint_fingerprint())
    except UserError as err:
        raise dg.Failure(description=str(err)) from None


@dg.observable_source_asset(
    description="The image set named in the pipeline file; data version = fingerprint of (path, size, mtime).",
    automation_condition=dg.AutomationCondition.cron_tick_passed(OBSERVE_EVERY),
)
def image_source() -> dg.DataVersion:
    from saev_core import pipeline
    from saev_core.errors import UserError

    try:
        return dg.DataVersion(pipeline.load_pipeline().images_fingerprint())
    except UserError as err:
        raise dg.Failure(description=str(err)) from None
