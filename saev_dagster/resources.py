"""The pipeline file as a Dagster resource: the one way every asset, check and source reads it."""

import dagster as dg


class SaevPipeline(dg.ConfigurableResource):
    """The experiment's pipeline file (TOML). The code location builds its partitions from the same file."""

    path: str = ""
    """Pipeline file; empty means $SAEV_PIPELINE, else the embedded demo pipeline."""

    show_progress: bool = False
    """Draw progress bars on the run's stderr (the demo's terminal); off for runs whose stderr only the UI shows."""

    def load(self):
        """The parsed ``saev_core.pipeline.Pipeline``. A bad file raises ``UserError`` naming file and key, which the
        body that calls this turns into a clean failure (``user_errors_fail_cleanly``)."""
        from saev_core.pipeline import file as pipeline_file

        return pipeline_file.load_pipeline(self.path or None)
