"""Run config: flat, primitive fields only. The pipeline file comes from the SaevPipeline resource; these fields
only override a few values for one run. Automated runs pass no config, so all have defaults."""

import dagster as dg


class ActivationsRunConfig(dg.Config):
    n_imgs: int = 0
    """Record only the first N images (0: as the pipeline file says)."""
    device: str = ""
    """auto, cpu or cuda (empty: as the pipeline file says)."""
    vit_batch_size: int = 0
    """Images per ViT forward pass (0: as the pipeline file says)."""
    n_workers_fanout: int = 0
    """Parallel recording ops, each writing a disjoint block range of the one store (0: the pipeline file's
    [activations] n_workers_fanout)."""

    def overrides(self) -> dict:
        """The fields the user set, as saev_core.config.ActivationsConfig field values."""
        return {
            key: value
            for key, value in {
                "n_imgs": self.n_imgs,
                "device": self.device,
                "vit_batch_size": self.vit_batch_size,
            }.items()
            if value
        }
