"""The explorer: a local Gradio app over a visuals folder (``python -m saev_core explore``).

Three tabs: **Latents** (every live latent, sorted by frequency, mean value, max value, id or class selectivity; its
top images as heatmaps and its value histogram, all from the top-k cache, with no SAE pass), **Explain an image**
(upload an image: where its top latents fire, via ``inference.Explainer``; pick one to open its top images) and
**Sweep** (the members of a sweep on an L0-vs-NMSE plot; open one member's latents, rendering its visuals first when
it has none). ``data`` holds the data side (``LatentBook``, ``SweepTable``; no Gradio), ``app`` the Gradio app
(Gradio is imported only when an app is built).
"""

from saev_core.explorer.app import Explorer, build_app, local_theme, serve
from saev_core.explorer.data import (
    N_IMAGES_SHOWN,
    N_TABLE_ROWS,
    SORT_KEYS,
    LatentBook,
    SweepTable,
    member_visuals_folder,
)

__all__ = [
    "N_IMAGES_SHOWN",
    "N_TABLE_ROWS",
    "SORT_KEYS",
    "Explorer",
    "LatentBook",
    "SweepTable",
    "build_app",
    "local_theme",
    "member_visuals_folder",
    "serve",
]
