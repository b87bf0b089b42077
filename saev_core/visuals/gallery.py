"""The browsable page of a top-k run: one static ``index.html`` next to the rendered heatmaps.

Layout under ``dump_to`` (the top-k module writes ``neurons/``; this module writes the rest)::

    index.html                      the page: frequency-vs-value plot, then one table row per latent
    freq_vs_value.png               log10 frequency vs log10 mean value of every latent that fires, selection drawn
    neurons/<latent>/<rank>.png     heatmaps, rank 0 = the latent's top image
    neurons/<latent>/metadata.json  linked from the latent's row
    originals/<image>.png           the pictures under the heatmaps, shown beside them or instead of them

The page opens from the file system (``file://``) and makes no network request: no CDN, no web fonts, CSS and JS
inline, and a Content-Security-Policy that allows images from files only. The table sorts by clicking a column
header (plain inline JS that reorders the rows; ties broken by latent id, NaN last). Controls at the top switch
the heatmap overlay off (the original shows in its place), the originals beside the heatmaps, the class outlines,
and the picture size; they only toggle classes on ``<body>``, so they cost nothing per image.

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
ORIGINALS_DIR = "originals"
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


def image_relpath(latent: int, rank: int) -> str:
    """Where the heatmap of ``latent``'s ``rank``-th image lives, relative to ``dump_to`` (POSIX separators)."""
    return f"{NEURONS_DIR}/{latent}/{rank}.png"


def original_relpath(image: int) -> str:
    """Where store image ``image``'s picture without a heatmap lives, relative to ``dump_to``."""
    return f"{ORIGINALS_DIR}/{image}.png"


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
    page = _page(title, rows, len(all_log10_freq), log_freq_range, log_value_range, lazy, class_latents, probe, counts)
    path = os.path.join(dump_to, "index.html")
    atomic_write_bytes(path, page.encode("utf-8"))
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
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; --h: 180px; }
body.size-s { --h: 112px; }
body.size-l { --h: 300px; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }
th button { font: inherit; font-weight: bold; background: none; border: 0; padding: 0; cursor: pointer; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.imgs { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; }
.pair { display: flex; gap: 2px; align-items: flex-start; }
.pic { position: relative; display: block; }
.pic img { height: var(--h); width: auto; display: block; }
.pic.plain img { height: calc(var(--h) * var(--r, 1)); }
body.no-overlay .pic.heat { display: none; }
body.no-beside:not(.no-overlay) .pic.plain { display: none; }
svg.outline { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
.pic.heat svg.outline { height: calc(100% * var(--r, 1)); }
body.no-outline svg.outline { display: none; }
figcaption { font-size: 11px; width: 0; min-width: 100%; overflow: hidden; text-overflow: ellipsis;
             white-space: nowrap; }
svg.hist { display: block; }
td.classes { min-width: 11em; }
.small { font-size: 11px; color: #666; }
#latents { width: 100%; }
#latents tr[data-latent] td { border-bottom: 0; }
#latents tr.pics td { border-bottom: 2px solid #ccc; padding-top: 0; }
#controls { position: sticky; top: 0; background: #fff; padding: 6px 0; z-index: 1; border-bottom: 1px solid #ddd; }
#controls label { margin-right: 1.2em; }
tr:target { background: #fff7d6; }
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
    // Each latent is two rows: its numbers (data-latent) and, under them, its pictures; they move together.
    var rows = Array.prototype.slice.call(tbody.querySelectorAll("tr[data-latent]"));
    rows.sort(function (a, b) {
      var x = num(a, key), y = num(b, key);
      var xNaN = isNaN(x), yNaN = isNaN(y);
      if (xNaN !== yNaN) { return xNaN ? 1 : -1; }
      if (!xNaN && x !== y) { return sign * (x < y ? -1 : 1); }
      return num(a, "latent") - num(b, "latent");
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (tr) {
      var pics = tr.nextElementSibling;
      frag.appendChild(tr);
      if (pics && pics.classList.contains("pics")) { frag.appendChild(pics); }
    });
    tbody.appendChild(frag);
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  headers.forEach(function (th) { th.addEventListener("click", function () { sortBy(th); }); });
  // The controls only set classes on <body>; the CSS does the rest.
  function bind(id, off) {
    var box = document.getElementById(id);
    if (!box) { return; }
    function apply() { document.body.classList.toggle(off, !box.checked); }
    box.addEventListener("change", apply);
    apply();
  }
  bind("overlay", "no-overlay");
  bind("beside", "no-beside");
  bind("outline", "no-outline");
  var size = document.getElementById("size");
  function resize() {
    document.body.classList.remove("size-s", "size-m", "size-l");
    document.body.classList.add("size-" + size.value);
  }
  size.addEventListener("change", resize);
  resize();
})();
"""

_CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
OUTLINE_COLOUR = "#00e5ff"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _url(rel: str) -> str:
    return _e(urllib.parse.quote(rel.replace(os.sep, "/"), safe="/"))


def _num(x: float | None, fmt: str = ".3f") -> str:
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


def histogram_range(counts) -> tuple[int, int] | None:
    """(first, last) bin a latent's histogram is drawn over: its non-empty bins and one more on each side (within
    the bins), so each latent gets its own axis; None when every bin is empty."""
    nonzero = np.flatnonzero(np.asarray(counts) > 0)
    if nonzero.size == 0:
        return None
    return max(int(nonzero[0]) - 1, 0), min(int(nonzero[-1]) + 1, len(counts) - 1)


def histogram_svg(counts, edges, width: int = 200, height: int = 44, marker: float | None = None) -> str:
    """Inline SVG bars of a histogram over its own non-empty bins (bar heights relative to the tallest), with a
    tooltip of its range; ``marker``: a value drawn as a red tick (the latent's log10 mean value)."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    total = int(counts.sum())
    span = histogram_range(counts)
    if span is None:  # nothing to draw: the full axis, empty
        first, last = 0, max(len(counts) - 1, 0)
    else:
        first, last = span
    lo, hi = edges[first], edges[last + 1] if len(edges) > last + 1 else edges[-1]
    tip = f"log10 value from {_num(lo, '.2f')} to {_num(hi, '.2f')}; {total} activations"
    parts, tick = [], ""
    if span is not None and hi > lo:
        shown = counts[first : last + 1]
        xs = (edges[first : last + 2] - lo) / (hi - lo) * width
        hs = shown / shown.max() * height
        for x0, x1, h in zip(xs[:-1], xs[1:], hs):
            if h > 0:
                parts.append(f"M{x0:.1f} {height}V{height - h:.1f}H{x1:.1f}V{height}Z")
        if marker is not None and math.isfinite(marker) and lo <= marker <= hi:
            x = (marker - lo) / (hi - lo) * width
            tick = f'<path d="M{x:.1f} 0V{height}" stroke="#d62728" stroke-width="1.5"/>'
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'data-lo="{_js_number(lo)}" data-hi="{_js_number(hi)}" data-bars="{len(parts)}" '
        f'aria-label="{_e(tip)}"><title>{_e(tip)}</title>'
        f'<rect width="{width}" height="{height}" fill="#f4f4f4"/>'
        f'<path d="{"".join(parts)}" fill="#4c72b0"/>{tick}</svg>'
        f'<div class="small">{_num(lo, ".1f")} … {_num(hi, ".1f")}</div>'
    )


def _figure(row: dict, rank: int, loading: str) -> str:
    """One heatmap, its original beside it, the class outline over both, the class name under them."""
    rel, label = row["images"][rank], row["labels"][rank]
    title = f"rank {rank}: {label}"
    heat_svg = plain_svg = ""
    sizes = row.get("sizes")
    ratio = 1.0 if not sizes else sizes[rank][1] / sizes[rank][2]
    outline = row.get("outlines", [""] * (rank + 1))[rank]
    if outline and sizes:
        width, height = sizes[rank][0], sizes[rank][1]
        path_id = f"outline-{row['latent']}-{rank}"
        box = f'class="outline" viewBox="0 0 {width} {height}" preserveAspectRatio="none" aria-hidden="true"'
        heat_svg = (
            f'<svg {box}><path id="{path_id}" d="{_e(outline)}" fill="none" stroke="{OUTLINE_COLOUR}" '
            'stroke-width="2" vector-effect="non-scaling-stroke"/></svg>'
        )
        plain_svg = f'<svg {box}><use href="#{path_id}"/></svg>'
    plain = ""
    if "originals" in row:
        orig = row["originals"][rank]
        plain = (
            f'<span class="pic plain"><a href="{_url(orig)}"><img src="{_url(orig)}" alt="{_e(label)} (original)" '
            f'title="{_e(title)} (original)"{loading}></a>{plain_svg}</span>'
        )
    return (
        f'<figure style="--r:{ratio:.4f}"><div class="pair"><span class="pic heat"><a href="{_url(rel)}">'
        f'<img src="{_url(rel)}" alt="{_e(label)}" title="{_e(title)}"{loading}></a>{heat_svg}</span>{plain}</div>'
        f"<figcaption>{_e(label)}</figcaption></figure>"
    )


def _count_text(row: dict) -> str:
    """How many heatmaps are shown of how many images the latent's top-k list holds."""
    n, n_top = row["n_heatmaps"], row.get("n_top")
    if n_top is None:
        return f"{n} shown"
    return f"{n} shown of its top-{n_top}"


def _row(row: dict, lazy: bool, with_classes: bool = False, with_probe: bool = False, top_k: int | None = None) -> str:
    latent = row["latent"]
    probe = [c for c in row.get("probe", ()) if c.get("ap") is not None]
    best_ap = max((c["ap"] for c in probe), default=math.nan)
    attrs = " ".join(
        f'data-{key}="{_js_number(value)}"'
        for key, value in (
            ("freq", row.get("log10_freq", math.nan)),
            ("mean", row.get("log10_mean_value", math.nan)),
            ("max", row.get("max_value", math.nan)),
            ("sel", row.get("selectivity", math.nan)),
            ("ap", best_ap),
        )
    )
    loading = ' loading="lazy"' if lazy else ""
    figures = "".join(_figure(row, rank, loading) for rank in range(row["n_heatmaps"]))
    hist = (
        histogram_svg(row["hist_counts"], row["hist_edges"], marker=row.get("log10_mean_value"))
        if "hist_counts" in row
        else ""
    )
    folder = f"{NEURONS_DIR}/{latent}"
    count = _count_text(row)
    if top_k is not None and row.get("n_top") is not None and row["n_top"] < top_k:
        count += f" (it fires on only {row['n_top']} images)"
    if "outline_class" in row:
        why = "its probe's class" if row.get("outline_source") == "probe" else "the class under most of its top patches"
        count += f' · <span class="outline-note">outlined: {_e(row["outline_class"])} ({why})</span>'
    n_columns = 5 + with_classes + with_probe
    return (
        f'<tr id="latent-{latent}" data-latent="{latent}" {attrs}>'
        f'<td class="num"><b>{latent}</b><br><a class="small" href="{_url(folder + "/metadata.json")}">'
        f'metadata</a> · <a class="small" href="{_url(folder + "/")}">folder</a></td>'
        f'<td class="num">{_num(row["log10_freq"])}</td><td class="num">{_num(row["log10_mean_value"])}</td>'
        f'<td class="num">{_num(row["max_value"], ".4g")}</td><td>{hist}</td>'
        f"{_classes_cell(row) if with_classes else ''}{_probe_cell(row) if with_probe else ''}</tr>\n"
        f'<tr class="pics" data-of="{latent}"><td colspan="{n_columns}"><div class="small count">{count}</div>'
        f'<div class="imgs">{figures}</div></td></tr>'
    )


def _classes_cell(row: dict) -> str:
    best = "<br>".join(f'{_e(name)} <span class="small">{_num(auroc)}</span>' for name, auroc in row.get("classes", ()))
    top = " · ".join(f"{_e(name)} {n}" for name, n in row.get("top_labels", ()))
    which = f"top-{row['n_top']} images" if row.get("n_top") is not None else "top images"
    return f'<td class="classes">{best or "–"}<div class="small top-labels">{which}: {top or "–"}</div></td>'


def _probe_cell(row: dict) -> str:
    lines = [
        f'best for <a href="#probe-{_e(urllib.parse.quote(str(c["class"])))}">{_e(c["class"])}</a>: '
        f"AP {_num(c.get('ap'))}"
        f' <span class="small">purity {_num(c.get("purity_at_k"))}</span>'
        for c in row.get("probe", ())
    ]
    return f"<td>{'<br>'.join(lines) or '–'}</td>"


def _latent_link(latent, on_page: set[int]) -> str:
    if latent is None:
        return "–"
    if latent in on_page:
        return f'<a href="#latent-{latent}">{latent}</a>'
    return f'<span title="not on this page: it never fires on this layer">{latent}</span>'


def _class_table(class_latents: dict, on_page: set[int]) -> str:
    """Per class, its best latents by AUROC (links to their rows: every one that fires is on the page)."""

    def cell(latent: int, auroc: float) -> str:
        return f'{_latent_link(latent, on_page)} <span class="small">{_num(auroc)}</span>'

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


def _probe_section(probe: dict, on_page: set[int]) -> str:
    """The "patch probes" section: per class its best latent (linked), AP and Purity@k, beside the controls."""
    controls = {name: c for name, c in (probe.get("controls") or {}).items() if isinstance(c, dict)}
    control_ap = {
        name: {row.get("class"): row.get("ap") for row in c.get("classes") or []} for name, c in controls.items()
    }
    k, tau = probe.get("k"), probe.get("tau")
    head = "".join(f"<th>{_e(name)} AP</th>" for name in controls)
    rows = "".join(
        f'<tr id="probe-{_e(c.get("class"))}"><td>{_e(c.get("class"))}</td>'
        f'<td class="num">{_latent_link(c.get("best_latent"), on_page)}</td>'
        f'<td class="num">{_num(c.get("ap"))}</td><td class="num">{_num(c.get("purity_at_k"))}</td>'
        f'<td class="num">{c.get("n_val", "–")}</td>'
        + "".join(f'<td class="num">{_num(control_ap[name].get(c.get("class")))}</td>' for name in controls)
        + "</tr>"
        for c in probe.get("classes") or []
    )
    versus = "; ".join(f"{_e(name)} mAP {_num(c.get('map'))}" for name, c in controls.items())
    return (
        '<h2 id="probes">Patch probes</h2><p class="small">One 1-D logistic probe per (latent, class) on the '
        "store's patch labels; each class's best latent by training loss, scored on held-out images: AP of its "
        f"patches, Purity@{_e(k)} (the share of its {_e(k)} top held-out patches of that class). Controls are the "
        "same probes on other encoders (docs/probes.md).</p>"
        f"<p>SAE: mAP {_num(probe.get('map'))}, Coverage@{_e(tau)} {_num(probe.get('coverage'))}, "
        f"Purity@{_e(k)} {_num(probe.get('purity_at_k'))}{'; ' + versus if versus else ''}.</p>"
        f'<table id="probe-classes"><thead><tr><th>class</th><th>best latent</th><th>AP</th>'
        f"<th>Purity@{_e(k)}</th><th>held-out patches</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )


def _controls(with_outlines: bool) -> str:
    outline = (
        f'<label><input type="checkbox" id="outline" checked> class outline '
        f'<span class="small" style="color:{OUTLINE_COLOUR}">&#9632;</span></label>'
        if with_outlines
        else ""
    )
    return (
        '<div id="controls"><label><input type="checkbox" id="overlay" checked> heatmap overlay</label>'
        '<label><input type="checkbox" id="beside" checked> original beside</label>'
        f'{outline}<label>size <select id="size"><option value="s">small</option>'
        '<option value="m" selected>medium</option><option value="l">large</option></select></label></div>'
    )


def _page(
    title: str,
    rows: list[dict],
    n_alive: int,
    freq_range,
    value_range,
    lazy: bool,
    class_latents: dict | None = None,
    probe: dict | None = None,
    counts: dict | None = None,
) -> str:
    def header(key: str, text: str) -> str:
        return f'<th data-key="{key}" aria-sort="none"><button type="button">{_e(text)}</button></th>'

    counts = counts or {}
    top_k, n_per_latent = counts.get("top_k"), counts.get("n_per_latent")
    with_classes = any("classes" in row for row in rows)
    with_probe = probe is not None
    on_page = {row["latent"] for row in rows}
    body = "\n".join(_row(row, lazy, with_classes, with_probe, top_k) for row in rows)
    classes = _class_table(class_latents, on_page) if class_latents else ""
    probes = _probe_section(probe, on_page) if with_probe else ""
    class_header = header("sel", "classes (AUROC)") if with_classes else ""
    probe_header = header("ap", "patch probe (AP)") if with_probe else ""
    n_heatmaps = sum(row["n_heatmaps"] for row in rows)
    kept = (
        f"Each latent keeps its top-{top_k} images (highest value, each image once); up to {n_per_latent} are "
        f"shown ({n_heatmaps} heatmaps on this page). Class counts cover the whole top-k list."
        if top_k is not None and n_per_latent is not None
        else f"{n_heatmaps} heatmaps on this page."
    )
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
{_e(_range_text("log10 mean value", value_range))}; every latent the tables below name is shown too.</p>
<img src="{_url(SCATTER_PNG)}" alt="log10 frequency vs log10 mean value of every latent that fires" width="640">
<p class="small">Heatmaps: each patch is coloured by the latent's value there over the latent's top value (the
colour says the value, the opacity grows with it), so the images of one latent compare; the original is beside
it. The strip under a heatmap is the CLS token's value. {_e(kept)} Histograms: each latent's own range of log10
value, the red tick at its mean. Under each latent's numbers, its top images, best first. Click a column header to
sort.</p>
{probes}
{classes}
{_controls(any(row.get("outlines") for row in rows))}
<table id="latents">
<thead><tr>{header("latent", "latent")}{header("freq", "log10 freq")}{header("mean", "log10 mean value")}
{header("max", "max value")}<th>log10 value histogram</th>{class_header}{probe_header}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<script>{_JS}</script>
</body>
</html>
"""
