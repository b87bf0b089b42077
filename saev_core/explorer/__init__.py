"""The explorer: a local Gradio app over a visuals folder (``python -m saev_core explore``).

Three tabs: **Latents** (every latent that fires on the store, sorted by best AP when the member has patch probes,
else by class selectivity, or by frequency, mean value, max value or id; its top images as heatmaps and its value
histogram, all from the top-k cache, with no SAE pass), **Explain an image** (upload an image, previewed at once:
where its top latents fire, via ``inference.Explainer``; pick one to open its top images) and **Sweep** (the members
of a sweep on an L0-vs-NMSE plot with the PCA baseline, and in a table with the controls; open one member's latents,
rendering its visuals first when it has none). The data side has no Gradio: ``latent_book``
(``LatentBook``: one visuals folder), ``probes`` (``PatchProbes``), ``sweep`` (``SweepTable``) and ``reading`` (the
files other jobs wrote); ``app`` is the Gradio app (Gradio is imported only when an app is built). Importing any
imports no torch: the visuals cache is read when the page first asks for it, the ViT when an upload is explained.
"""

from saev_core.explorer.app import Explorer, build_app, local_theme, serve
from saev_core.explorer.latent_book import N_IMAGES_SHOWN, N_TABLE_ROWS, SORT_KEYS, LatentBook
from saev_core.explorer.probes import PatchProbes
from saev_core.explorer.sweep import SweepTable, member_visuals_folder

__all__ = [
    "N_IMAGES_SHOWN",
    "N_TABLE_ROWS",
    "SORT_KEYS",
    "Explorer",
    "LatentBook",
    "PatchProbes",
    "SweepTable",
    "build_app",
    "local_theme",
    "member_visuals_folder",
    "serve",
]
