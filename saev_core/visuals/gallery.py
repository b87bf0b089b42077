"""The browsable page of a top-k run: one static ``index.html`` next to the rendered heatmaps.

Layout under ``dump_to`` (the top-k module writes ``neurons/``; this module writes the rest)::

    index.html                      the page: frequency-vs-value plot, then one table row per latent
    freq_vs_value.png               log10 frequency vs log10 mean value of every latent that fires, selection drawn
    neurons/<latent>/<rank>.png     heatmaps, rank 0 = the latent's top image
    neurons/<latent>/metadata.json  linked from the latent's row

The page opens from the file system (``file://``) and makes no network request: no CDN, no web fonts, CSS and JS
inline, and a Content-Security-Policy that allows images from files only. The table sorts by clicking a column
header (plain inline JS that reorders the rows; ties broken by latent id, NaN last).

Value histograms are inline SVG, one ``<path>`` per latent built from the counts: measured 60 microseconds for 40
bins, so ten thousand latents add under a second, where even one reused matplotlib figure costs 34 ms per latent
(six minutes for ten thousand) plus one more file and request each; SVG also stays sharp at any zoom.
"""

import collections
import html
import io
import math
import os
import urllib.parse
from collections.abc import Sequence
from typing import NotRequired, TypedDict

import numpy as np
from jaxtyping import Float
from PIL import Image, ImageDraw

from saev_core.files import atomic_write_bytes

NEURONS_DIR = "neurons"
SCATTER_PNG = "freq_vs_value.png"
LAZY_ABOVE_N_IMAGES = 600
"""With ``lazy_images=None``, images load lazily (as they scroll into view) only on pages with more images than
this: a page of thousands of eager images takes long to open, but lazy images never load in a headless render."""
_RANGE_COLOUR = "#d62728"
_SHOWN_COLOUR = "#ff7f0e"


class GalleryLatent(TypedDict):
    """One row of the page (a plain dict with these keys)."""

    latent: int
    log10_freq: float
    """log10 of the fraction of patches on which the latent fires."""
    log10_mean_value: float
    """log10 of its mean value where it fires."""
    max_value: float
    """Its top value (the heatmaps' vmax)."""
    n_images: int
    """How many images were rendered (the lengths of ``images`` and ``labels``)."""
    images: Sequence[str]
    """Rendered files relative to ``dump_to``, best first: ``image_relpath(latent, rank)``."""
    labels: Sequence[str]
    """Class name of each image."""
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


def image_relpath(latent: int, rank: int) -> str:
    """Where the heatmap of ``latent``'s ``rank``-th image lives, relative to ``dump_to`` (POSIX separators)."""
    return f"{NEURONS_DIR}/{latent}/{rank}.png"


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
) -> str:
    """Write ``dump_to/index.html`` (and the scatter PNG) for ``latents``, in the given order; returns its path.

    ``all_log10_freq`` / ``all_log10_value``: every latent that fires on the store, for the scatter plot
    (non-finite points are left out). ``log_*_range``: the selection, ``(low, high)`` with either end None for open,
    or None for none. Every image must already exist under ``dump_to``. Files are written atomically.
    ``class_latents``: per class, its best latents by AUROC, shown as a table above the latents (rows with classes
    get a class column too)."""
    dump_to = os.fspath(dump_to)
    rows = [_check_latent(entry, dump_to) for entry in latents]
    ids = [row["latent"] for row in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
        raise ValueError(f"latent ids must be unique on one page; repeated: {dupes[:10]}")
    n_images = sum(row["n_images"] for row in rows)
    lazy = n_images > LAZY_ABOVE_N_IMAGES if lazy_images is None else lazy_images

    shown = np.array([[row["log10_freq"], row["log10_mean_value"]] for row in rows], dtype=np.float64)
    png = freq_vs_value_png(all_log10_freq, all_log10_value, shown.reshape(-1, 2), log_freq_range, log_value_range)
    atomic_write_bytes(os.path.join(dump_to, SCATTER_PNG), png)

    page = _page(title, rows, len(all_log10_freq), log_freq_range, log_value_range, lazy, class_latents)
    path = os.path.join(dump_to, "index.html")
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _check_latent(entry, dump_to: str) -> dict:
    missing = [
        k
        for k in ("latent", "log10_freq", "log10_mean_value", "max_value", "n_images", "images", "labels")
        if k not in entry
    ]
    if missing:
        raise ValueError(f"gallery entry {entry.get('latent', '?')!r} lacks {missing}; see GalleryLatent")
    row = dict(entry)
    row["latent"] = int(entry["latent"])
    row["images"], row["labels"] = list(entry["images"]), [str(label) for label in entry["labels"]]
    row["n_images"] = int(entry["n_images"])
    if not len(row["images"]) == len(row["labels"]) == row["n_images"]:
        raise ValueError(
            f"latent {row['latent']}: n_images={row['n_images']} but {len(row['images'])} images and "
            f"{len(row['labels'])} labels; give one label per rendered image"
        )
    for rel in row["images"]:
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


# ------------------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------------------


def freq_vs_value_png(
    log10_freq: Float[np.ndarray, " n_latents"],
    log10_value: Float[np.ndarray, " n_latents"],
    shown: Float[np.ndarray, "n_shown 2"],
    log_freq_range: tuple[float | None, float | None] | None = None,
    log_value_range: tuple[float | None, float | None] | None = None,
) -> bytes:
    """Scatter of every latent (grey), the ones on the page (orange, ``shown[:, 0]`` freq, ``[:, 1]`` value) and
    the selection bounds (red lines; a shaded box where both ranges are given), as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = np.isfinite(log10_freq) & np.isfinite(log10_value)
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(
        log10_freq[ok],
        log10_value[ok],
        s=4,
        c="0.55",
        alpha=0.6,
        linewidths=0,
        label=f"latents that fire ({int(ok.sum())})",
    )
    on_page = np.isfinite(shown).all(axis=1)
    if on_page.any():
        ax.scatter(
            shown[on_page, 0],
            shown[on_page, 1],
            s=14,
            c=_SHOWN_COLOUR,
            linewidths=0,
            label=f"on this page ({int(on_page.sum())})",
        )
    freq_lo, freq_hi = log_freq_range or (None, None)
    value_lo, value_hi = log_value_range or (None, None)
    drawn = False
    for bound in (freq_lo, freq_hi):
        if bound is not None:
            ax.axvline(bound, color=_RANGE_COLOUR, lw=1.5, label=None if drawn else "selected ranges")
            drawn = True
    for bound in (value_lo, value_hi):
        if bound is not None:
            ax.axhline(bound, color=_RANGE_COLOUR, lw=1.5, label=None if drawn else "selected ranges")
            drawn = True
    if None not in (freq_lo, freq_hi, value_lo, value_hi):
        ax.fill_between([freq_lo, freq_hi], value_lo, value_hi, color=_RANGE_COLOUR, alpha=0.08, linewidth=0)
    ax.set_xlabel("log10 frequency (fraction of patches where the latent fires)")
    ax.set_ylabel("log10 mean value (where it fires)")
    ax.grid(alpha=0.3)
    if ok.any() or on_page.any() or drawn:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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


# ------------------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }
th button { font: inherit; font-weight: bold; background: none; border: 0; padding: 0; cursor: pointer; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.imgs { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; }
figure img { height: 112px; width: auto; display: block; }
figcaption { font-size: 11px; width: 0; min-width: 100%; overflow: hidden; text-overflow: ellipsis;
             white-space: nowrap; }
svg.hist { display: block; }
.small { font-size: 11px; color: #666; }
"""

_JS = """
(function () {
  "use strict";
  var table = document.getElementById("latents");
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.querySelectorAll("th[data-key]"));
  function num(tr, key) { return parseFloat(tr.getAttribute("data-" + key)); }
  function sortBy(th) {
    var key = th.getAttribute("data-key");
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var sign = ascending ? 1 : -1;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = num(a, key), y = num(b, key);
      var xNaN = isNaN(x), yNaN = isNaN(y);
      if (xNaN !== yNaN) { return xNaN ? 1 : -1; }
      if (!xNaN && x !== y) { return sign * (x < y ? -1 : 1); }
      return num(a, "latent") - num(b, "latent");
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (tr) { frag.appendChild(tr); });
    tbody.appendChild(frag);
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  headers.forEach(function (th) { th.addEventListener("click", function () { sortBy(th); }); });
})();
"""

_CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _url(rel: str) -> str:
    return _e(urllib.parse.quote(rel.replace(os.sep, "/"), safe="/"))


def _num(x: float, fmt: str = ".3f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, fmt)


def _js_number(x: float) -> str:
    """A float as JavaScript's parseFloat reads it back (NaN and the infinities spelled its way)."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def _range_text(name: str, bounds) -> str:
    if bounds is None or bounds == (None, None):
        return f"{name}: any"
    lo, hi = bounds
    return f"{name}: [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def histogram_svg(counts, edges, width: int = 160, height: int = 36) -> str:
    """Inline SVG bars of a histogram (bar heights relative to the tallest), with a tooltip of its range."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    span = edges[-1] - edges[0]
    total = int(counts.sum())
    tip = f"log10 value from {_num(edges[0], '.2f')} to {_num(edges[-1], '.2f')}; {total} activations"
    parts = []
    if counts.size and counts.max() > 0 and span > 0:
        xs = (edges - edges[0]) / span * width
        hs = counts / counts.max() * height
        for x0, x1, h in zip(xs[:-1], xs[1:], hs):
            if h > 0:
                parts.append(f"M{x0:.1f} {height}V{height - h:.1f}H{x1:.1f}V{height}Z")
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(tip)}"><title>{_e(tip)}</title>'
        f'<rect width="{width}" height="{height}" fill="#f4f4f4"/>'
        f'<path d="{"".join(parts)}" fill="#4c72b0"/></svg>'
        f'<div class="small">{_num(edges[0], ".2f")} … {_num(edges[-1], ".2f")}</div>'
    )


def _row(row: dict, lazy: bool, with_classes: bool = False) -> str:
    latent = row["latent"]
    attrs = " ".join(
        f'data-{key}="{_js_number(row.get(field, math.nan))}"'
        for key, field in (
            ("freq", "log10_freq"),
            ("mean", "log10_mean_value"),
            ("max", "max_value"),
            ("sel", "selectivity"),
        )
    )
    loading = ' loading="lazy"' if lazy else ""
    figures = "".join(
        f'<figure><a href="{_url(rel)}"><img src="{_url(rel)}" alt="{_e(label)}" title="rank {rank}: {_e(label)}"'
        f"{loading}></a><figcaption>{_e(label)}</figcaption></figure>"
        for rank, (rel, label) in enumerate(zip(row["images"], row["labels"]))
    )
    hist = histogram_svg(row["hist_counts"], row["hist_edges"]) if "hist_counts" in row else ""
    folder = f"{NEURONS_DIR}/{latent}"
    return (
        f'<tr id="latent-{latent}" data-latent="{latent}" {attrs}>'
        f'<td class="num"><b>{latent}</b><br><a class="small" href="{_url(folder + "/metadata.json")}">'
        f'metadata</a> · <a class="small" href="{_url(folder + "/")}">folder</a></td>'
        f'<td class="num">{_num(row["log10_freq"])}</td><td class="num">{_num(row["log10_mean_value"])}</td>'
        f'<td class="num">{_num(row["max_value"], ".4g")}</td><td>{hist}</td>'
        f'{_classes_cell(row) if with_classes else ""}<td><div class="imgs">{figures}</div></td></tr>'
    )


def _classes_cell(row: dict) -> str:
    best = "<br>".join(f'{_e(name)} <span class="small">{_num(auroc)}</span>' for name, auroc in row.get("classes", ()))
    top = ", ".join(f"{_e(name)} {n}" for name, n in row.get("top_labels", ()))
    return f'<td>{best or "–"}<div class="small">top images: {top or "–"}</div></td>'


def _class_table(class_latents: dict, on_page: set[int]) -> str:
    """Per class, its best latents by AUROC (links to the rows on this page)."""

    def cell(latent: int, auroc: float) -> str:
        name = f'<a href="#latent-{latent}">{latent}</a>' if latent in on_page else str(latent)
        return f'{name} <span class="small">{_num(auroc)}</span>'

    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{' · '.join(cell(j, a) for j, a in best)}</td></tr>"
        for name, best in class_latents.items()
    )
    return (
        '<h2>Latents per class</h2><p class="small">AUROC of a latent\'s value on an image (its best patch, or '
        "its CLS value) for telling the class from the others, over the store's images; 0.5 is chance.</p>"
        f'<table id="classes"><thead><tr><th>class</th><th>best latents (AUROC)</th></tr></thead><tbody>{rows}'
        "</tbody></table>"
    )


def _page(
    title: str, rows: list[dict], n_alive: int, freq_range, value_range, lazy: bool, class_latents: dict | None = None
) -> str:
    def header(key: str, text: str) -> str:
        return f'<th data-key="{key}" aria-sort="none"><button type="button">{_e(text)}</button></th>'

    with_classes = any("classes" in row for row in rows)
    body = "\n".join(_row(row, lazy, with_classes) for row in rows)
    classes = _class_table(class_latents, {row["latent"] for row in rows}) if class_latents else ""
    class_header = header("sel", "classes (AUROC)") if with_classes else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p>{len(rows)} latents shown of {n_alive} that fire. Selection: {_e(_range_text("log10 frequency", freq_range))};
{_e(_range_text("log10 mean value", value_range))}.</p>
<img src="{_url(SCATTER_PNG)}" alt="log10 frequency vs log10 mean value of every latent that fires" width="640">
<p class="small">Heatmaps: each patch is coloured by the latent's value there, with opacity proportional to the
value over the latent's top value, so the images of one latent compare. Click a column header to sort.</p>
{classes}
<table id="latents">
<thead><tr>{header("latent", "latent")}{header("freq", "log10 freq")}{header("mean", "log10 mean value")}
{header("max", "max value")}<th>log10 value histogram</th>{class_header}<th>top images (best first)</th></tr></thead>
<tbody>
{body}
</tbody>
</table>
<script>{_JS}</script>
</body>
</html>
"""
