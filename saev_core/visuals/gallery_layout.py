"""Where a visuals folder's files go, relative to its ``dump_to`` (POSIX separators, as the gallery links them):
the heatmaps and each latent's metadata.json, the originals under them, the scatter plot. The job writes these
paths, the page links them and the completeness check looks for them."""

NEURONS_DIR = "neurons"
ORIGINALS_DIR = "originals"
SCATTER_PNG = "freq_vs_value.png"


def image_relpath(latent: int, rank: int) -> str:
    """Where the heatmap of ``latent``'s ``rank``-th image lives, relative to ``dump_to`` (POSIX separators)."""
    return f"{NEURONS_DIR}/{latent}/{rank}.png"


def original_relpath(image: int) -> str:
    """Where store image ``image``'s picture without a heatmap lives, relative to ``dump_to``."""
    return f"{ORIGINALS_DIR}/{image}.png"
