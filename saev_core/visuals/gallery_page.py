"""The gallery's HTML: the table of latents (numbers, value histogram as inline SVG, classes, probes, then the
heatmaps beside their originals with the class outline), the class table and the "patch probes" section, every named
latent linked to its row. Every text from data is escaped and every link URL-quoted."""

import html
import math
import os
import urllib.parse

import numpy as np

from saev_core.visuals.gallery_layout import NEURONS_DIR, SCATTER_PNG
from saev_core.visuals.gallery_style import CSP, CSS, JS, OUTLINE_COLOUR


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


def page(
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
<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style>
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
<script>{JS}</script>
</body>
</html>
"""
