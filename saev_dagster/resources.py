"""The pipeline file as a Dagster resource: the one way every asset, check and source reads it."""

import dagster as dg


class SaevPipeline(dg.ConfigurableResource):
    """The experiment's pipeline file (TOML). The code location builds its partitions from the same file."""

    path: str = ""
    """Pipeline file; empty means $SAEV_PIPELINE, else the embedded demo pipeline."""

    def load(self):
        """The parsed ``saev_core.pipeline.Pipeline``; a bad file is a clear Dagster failure naming file and key."""
        from saev_core.pipeline import file as pipeline_file

        return fail_clearly(pipeline_file.load_pipeline, self.path or None)


def fail_clearly(fn, *args, **kwargs):
    """Call a saev_core function; a UserError (bad input, with its fix) becomes a Dagster failure, not a traceback."""
    from saev_core.errors import UserError

    try:
        return fn(*args, **kwargs)
    except UserError as err:
        raise dg.Failure(description=str(err)) from None
