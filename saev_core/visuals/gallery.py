"""The browsable page of a top-k run: one static ``index.html`` next to the rendered heatmaps, and the small preview
grid shown inline in Dagster.

Layout under ``dump_to`` (``gallery_layout``; the visuals job writes ``neurons/`` and ``originals/``, this module
the rest)::

    index.html                      the page: frequency-vs-value plot, then one table row per latent
    freq_vs_value.png               log10 frequency vs log10 mean value of every latent that fires, selection drawn
    neurons/<latent>/<rank>.png     heatmaps, rank 0 = the latent's top image
    neurons/<latent>/metadata.json  linked from the latent's row
    originals/<image>.png           the pictures under the heatmaps, shown beside them or instead of them

The page opens from the file system (``file://``) and makes no network request: no CDN, no web fonts, CSS and JS
inline, and a Content-Security-Policy that allows images from files only. The table sorts by clicking a column
header (plain inline JS that reorders the rows; ties broken by latent id, NaN last). Controls at the top switch
the heatmap overlay off (the original shows in its place), the originals beside the heatmaps, the class outlines,
and the picture size; they only toggle classes on ``<body>``, so they cost nothing per image. The HTML is built in
``gallery_page`` (its static CSS and JS in ``gallery_style``), the scatter plot in ``scatter``.

Value histograms are inline SVG, one ``<path>`` per latent built from the counts: measured 60 microseconds for 40
bins, so ten thousand latents add under a second, where even one reused matplotlib figure costs 34 ms per latent
(six minutes for ten thousand) plus one more file and request each; SVG also stays sharp at any zoom.
"""

import collections
import io
import os
from collections.abc import Sequence
from typing import NotRequired, TypedDict

import numpy as np
from jaxtyping import Float
from PIL import Image, ImageDraw

from saev_core.files import atomic_write_bytes
from saev_core.visuals.gallery_layout import SCATTER_PNG, image_relpath
from saev_core.visuals.gallery_page import page
from saev_core.visuals.scatter import freq_vs_value_png

LAZY_ABOVE_N_IMAGES = 600
"""With ``lazy_images=None``, images load lazily (as they scroll into view) only on pages with more images than
this: a page of thousands of eager images takes long to open, but lazy images never load in a headless render."""


class GalleryLatent(TypedDict):
    """One row of the page (a plain dict with these keys)."""

    latent: int
    log10_freq: float
    """log10 of the fraction of patches on which the latent fires."""
    log10_mean_value: float
    """log10 of its mean value where it fires."""
    max_value: float
    """Its top value (the heatmaps' vmax)."""
    n_heatmaps: int
    """How many heatmaps were rendered (the lengths of ``images`` and ``labels``)."""
    images: Sequence[str]
    """Rendered files relative to ``dump_to``, best first: ``image_relpath(latent, rank)``."""
    labels: Sequence[str]
    """Class name of each image."""
    n_top: NotRequired[int]
    """How many images its top-k list holds (filled slots; the label counts cover these, not only the shown)."""
    originals: NotRequired[Sequence[str]]
    """Each heatmap's picture without the overlay, relative to ``dump_to`` (``original_relpath``)."""
    sizes: NotRequired[Sequence[tuple[int, int, int]]]
    """Each heatmap's (width, picture height, file height): the file may have a CLS strip below the picture."""
    outline_class: NotRequired[str]
    """The patch class outlined on its heatmaps, with ``outline_source`` (why) and ``outlines`` (SVG path data per
    image, in the picture's pixels)."""
    outline_source: NotRequired[str]
    outlines: NotRequired[Sequence[str]]
    probe: NotRequired[Sequence[dict]]
    """The classes whose best patch probe it is: ``class``, ``ap``, ``purity_at_k``."""
    hist_counts: NotRequired[Sequence[int] | np.ndarray]
    """Histogram of log10 of the latent's non-zero values (optional, with ``hist_edges``)."""
    hist_edges: NotRequired[Sequence[float] | np.ndarray]
    """Bin edges in log10 value (one more than the counts)."""
    classes: NotRequired[Sequence[tuple[str, float]]]
    """The latent's best classes with their AUROC (``association``), best first."""
    top_labels: NotRequired[Sequence[tuple[str, int]]]
    """The commonest classes among its top-k images, with counts."""
    selectivity: NotRequired[float]
    """Its best AUROC over the classes (the column that sorts by class selectivity)."""


def write_gallery(
    dump_to: str | os.PathLike,
    latents: Sequence[GalleryLatent],
    all_log10_freq: Float[np.ndarray, " n_latents"],
    all_log10_value: Float[np.ndarray, " n_latents"],
    log_freq_range: tuple[float | None, float | None] | None = None,
    log_value_range: tuple[float | None, float | None] | None = None,
    title: str = "SAE latents: top images",
    lazy_images: bool | None = None,
    class_latents: dict[str, Sequence[tuple[int, float]]] | None = None,
    probe: dict | None = None,
    top_k: int | None = None,
    n_per_latent: int | None = None,
) -> str:
    """Write ``dump_to/index.html`` (and the scatter PNG) for ``latents``, in the given order; returns its path.

    ``all_log10_freq`` / ``all_log10_value``: every latent that fires on the store, for the scatter plot
    (non-finite points are left out). ``log_*_range``: the selection, ``(low, high)`` with either end None for open,
    or None for none. Every image must already exist under ``dump_to``. Files are written atomically.
    ``class_latents``: per class, its best latents by AUROC, shown as a table above the latents (rows with classes
    get a class column too). ``probe``: a probe.json (docs/probes.md), shown as the "patch probes" section.
    ``top_k`` and ``n_per_latent``: the run's settings, said in the page's counts."""
    dump_to = os.fspath(dump_to)
    rows = [_check_latent(entry, dump_to) for entry in latents]
    ids = [row["latent"] for row in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
        raise ValueError(f"latent ids must be unique on one page; repeated: {dupes[:10]}")
    n_heatmaps = sum(row["n_heatmaps"] for row in rows)
    lazy = n_heatmaps > LAZY_ABOVE_N_IMAGES if lazy_images is None else lazy_images

    shown = np.array([[row["log10_freq"], row["log10_mean_value"]] for row in rows], dtype=np.float64)
    png = freq_vs_value_png(all_log10_freq, all_log10_value, shown.reshape(-1, 2), log_freq_range, log_value_range)
    atomic_write_bytes(os.path.join(dump_to, SCATTER_PNG), png)

    counts = {"top_k": top_k, "n_per_latent": n_per_latent}
    html = page(title, rows, len(all_log10_freq), log_freq_range, log_value_range, lazy, class_latents, probe, counts)
    path = os.path.join(dump_to, "index.html")
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


def _check_latent(entry, dump_to: str) -> dict:
    missing = [
        k
        for k in ("latent", "log10_freq", "log10_mean_value", "max_value", "n_heatmaps", "images", "labels")
        if k not in entry
    ]
    if missing:
        raise ValueError(f"gallery entry {entry.get('latent', '?')!r} lacks {missing}; see GalleryLatent")
    row = dict(entry)
    row["latent"] = int(entry["latent"])
    row["images"], row["labels"] = list(entry["images"]), [str(label) for label in entry["labels"]]
    row["n_heatmaps"] = int(entry["n_heatmaps"])
    if not len(row["images"]) == len(row["labels"]) == row["n_heatmaps"]:
        raise ValueError(
            f"latent {row['latent']}: n_heatmaps={row['n_heatmaps']} but {len(row['images'])} images and "
            f"{len(row['labels'])} labels; give one label per rendered image"
        )
    for key in ("originals", "sizes", "outlines"):
        if key in entry and len(entry[key]) != row["n_heatmaps"]:
            raise ValueError(f"latent {row['latent']}: {len(entry[key])} {key} for {row['n_heatmaps']} heatmaps")
    for rel in [*row["images"], *entry.get("originals", ())]:
        if os.path.isabs(rel) or "://" in rel:
            raise ValueError(f"latent {row['latent']}: image {rel!r} must be a path relative to {dump_to!r}")
        if not os.path.isfile(os.path.join(dump_to, rel)):
            raise FileNotFoundError(
                f"latent {row['latent']}: image {rel!r} is not in {dump_to!r}; render the "
                "heatmaps before writing the gallery"
            )
    if ("hist_counts" in entry) != ("hist_edges" in entry):
        raise ValueError(f"latent {row['latent']}: give both hist_counts and hist_edges, or neither")
    if "hist_counts" in entry and len(entry["hist_edges"]) != len(entry["hist_counts"]) + 1:
        raise ValueError(
            f"latent {row['latent']}: {len(entry['hist_counts'])} histogram counts need "
            f"{len(entry['hist_counts']) + 1} edges, got {len(entry['hist_edges'])}"
        )
    return row


def preview_grid(dump_to: str | os.PathLike, latent_ids: Sequence[int], n_per_latent: int, thumb: int = 64) -> bytes:
    """A small PNG: one row per latent (its id, then its top ``n_per_latent`` heatmaps as ``thumb`` px
    thumbnails, aspect kept, centred); missing images are grey squares. For showing inline in Dagster."""
    dump_to = os.fspath(dump_to)
    gap, label_w = 2, 8 * max([len(str(i)) for i in latent_ids] + [3]) + 8
    n_rows = max(len(latent_ids), 1)
    canvas = Image.new("RGB", (label_w + n_per_latent * (thumb + gap) + gap, n_rows * (thumb + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if not latent_ids:
        draw.text((4, gap + thumb // 2 - 6), "no latents selected", fill="black")
    for i, latent in enumerate(latent_ids):
        y = gap + i * (thumb + gap)
        draw.text((4, y + thumb // 2 - 6), str(latent), fill="black")
        for rank in range(n_per_latent):
            x = label_w + gap + rank * (thumb + gap)
            path = os.path.join(dump_to, image_relpath(latent, rank))
            if not os.path.isfile(path):
                draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(200, 200, 200))
                continue
            with Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
            canvas.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
