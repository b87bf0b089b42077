"""A gallery for reading features, on a planted store with image classes and per-patch labels: per-latent histogram
ranges and the page's counts against a plain recomputation from the planted activations, every latent the class
table and a planted probe.json name rendered and linked, the probe's class outlined on its latent's heatmaps, and
the overlay / original / outline / size controls working in Chromium."""

import html
import json
import os
import re

import numpy as np
import pytest

from saev_core import config
from saev_core.errors import UserError
from saev_core.store import write_store
from saev_core.visuals import render, top_images, topk_cache
from tests.browser import chromium_or_skip
from tests.helpers import identity_sae, store_with_class_images

N_IMGS, GRID, D, SIDE = 30, 4, 12, 32
N_PATCHES = GRID * GRID
PLANTED = 3
"""Latent PLANTED fires exactly on the patches labelled GRASS (identity SAE: latent j is relu(x_j))."""
PATCH_NAMES = ["unlabelled", "sky", "grass", "water"]
GRASS = 2
PROBE_ONLY = 11
"""A latent the planted probe.json names; the selection draws nothing, so only the tables bring it in."""
TOP_K, N_SHOWN = 8, 3


def planted_probe(store_key: str) -> dict:
    return {
        "ckpt": "planted",
        "store_key": store_key,
        "layer": -1,
        "map": 0.7,
        "coverage": 0.5,
        "purity_at_k": 0.75,
        "k": 10,
        "tau": 0.3,
        "classes": [
            {"class": "sky", "best_latent": PROBE_ONLY, "ap": 0.4, "purity_at_k": 0.5, "n_val": 17},
            {"class": "grass", "best_latent": PLANTED, "ap": 1.0, "purity_at_k": 1.0, "n_val": 23},
            {"class": "water", "best_latent": None, "ap": None, "purity_at_k": None, "n_val": 0},
        ],
        "controls": {"pca": {"name": "pca", "map": 0.1, "classes": [{"class": "grass", "ap": 0.25}]}},
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Image classes bird/cat, random patch labels (0 = unlabelled), latent PLANTED positive exactly on grass
    patches, the others noise; a planted probe.json where the pipeline's probe stage puts it."""
    root = tmp_path_factory.mktemp("reading")
    rng = np.random.default_rng(0)
    labels = np.arange(N_IMGS) % 2
    patch_labels = rng.integers(0, len(PATCH_NAMES), (N_IMGS, N_PATCHES))
    acts = rng.normal(0, 1, (1, N_IMGS, 1 + N_PATCHES, D)).astype(np.float32)
    acts[0, :, 1:, PLANTED] = np.where(patch_labels == GRASS, rng.uniform(0.5, 2.0, (N_IMGS, N_PATCHES)), -1.0)
    acts[0, :, 1:, PROBE_ONLY] -= 1.5  # fires rarely: outside a narrow selection, so only the probe brings it in
    store = store_with_class_images(
        root, acts, labels, ["bird", "cat"], rng, side=SIDE, patch_labels=patch_labels, patch_class_names=PATCH_NAMES
    )
    ckpt = identity_sae(root / "member" / "sae.pt", store.path, D)
    os.makedirs(root / "member" / "probes")
    (root / "member" / "probes" / "probe.json").write_text(json.dumps(planted_probe(store.metadata.key)))
    return root, store, ckpt, acts, labels, patch_labels


def visuals_cfg(planted, dump_to, **kw) -> config.VisualsConfig:
    _, store, ckpt, *_ = planted
    fields = dict(
        ckpt=ckpt,
        dump_to=str(dump_to),
        data=config.VisualsDataConfig(shard_root=store.path, layer=-1, patches="patches"),
        top_k=TOP_K,
        n_imgs_per_latent=N_SHOWN,
        log_freq_range=(-10.0, 0.0),
        log_value_range=(-10.0, 10.0),
        n_latents=0,  # nothing drawn: every latent on the page is there because a table names it
        device="cpu",
    )
    fields.update(kw)
    return config.VisualsConfig(**fields)


@pytest.fixture(scope="module")
def made(planted, tmp_path_factory):
    dump_to = tmp_path_factory.mktemp("v")
    result = render.make_visuals(visuals_cfg(planted, dump_to), show_progress=False)
    return dump_to, result, (dump_to / "index.html").read_text()


def rows_of(page: str) -> dict[int, str]:
    """Each latent row's HTML, by latent id."""
    found = re.finditer(r'<tr id="latent-(\d+)".*?</tr>\s*<tr class="pics" data-of="\1">.*?</tr>', page, re.S)
    return {int(m.group(1)): m.group(0) for m in found}


def plain_values(acts) -> np.ndarray:
    """[imgs, patches, latents]: the identity relu SAE's values, recomputed plainly."""
    return np.maximum(acts[0, :, 1:], 0.0)


# ------------------------------------------------------------------------------------------------------------
# Counts and histograms against a plain recomputation
# ------------------------------------------------------------------------------------------------------------


def test_histograms_use_each_latents_own_range(planted, made):
    *_, acts, _, _ = planted
    _, result, page = made
    values = plain_values(acts)
    edges = top_images.HIST_EDGES
    checked = 0
    for latent, row in rows_of(page).items():
        fired = values[..., latent][values[..., latent] > 0]
        bins = np.searchsorted(edges[1:-1], np.log10(fired), side="left")  # value on an inner edge: lower bin
        counts = np.bincount(bins, minlength=len(edges) - 1)
        first = max(np.flatnonzero(counts)[0] - 1, 0)
        last = min(np.flatnonzero(counts)[-1] + 1, len(counts) - 1)
        svg = re.search(r'<svg class="hist"[^>]*data-lo="([^"]+)" data-hi="([^"]+)" data-bars="(\d+)"', row)
        assert float(svg.group(1)) == pytest.approx(edges[first]), latent
        assert float(svg.group(2)) == pytest.approx(edges[last + 1]), latent
        assert int(svg.group(3)) == int((counts > 0).sum()), latent
        checked += 1
    assert checked == len(result.latents) >= 3
    los = {re.search(r'data-lo="([^"]+)"', row).group(1) for row in rows_of(page).values()}
    assert len(los) > 1  # not one axis for all


def test_counts_say_heatmaps_shown_of_the_top_k_list(planted, made):
    *_, acts, labels, _ = planted
    dump_to, result, page = made
    best = plain_values(acts).max(axis=1)  # [imgs, latents]: each image's ranking value
    selection = json.loads((dump_to / "cache" / "selection.json").read_text())
    assert selection["n_heatmaps"] == selection["n_images"]  # the old name, kept for older readers
    assert result.n_heatmaps == sum(selection["n_heatmaps"]) == result.n_images
    rows = rows_of(page)
    for latent, n in zip(selection["latents"], selection["n_heatmaps"]):
        firing = np.flatnonzero(best[:, latent] > 0)
        order = firing[np.lexsort((firing, -best[firing, latent]))]  # value, then the lower index
        n_top = min(TOP_K, len(order))
        assert n == min(N_SHOWN, n_top)
        pngs = [p for p in os.listdir(dump_to / "neurons" / str(latent)) if p.endswith(".png")]
        assert len(pngs) == n
        row = rows[latent]
        assert f"{n} shown of its top-{n_top}" in row
        assert ("fires on only" in row) == (n_top < TOP_K)
        counts = np.bincount(labels[order[:n_top]], minlength=2)
        shares = " · ".join(
            f"{['bird', 'cat'][c]} {counts[c]}" for c in np.argsort(-counts, kind="stable") if counts[c]
        )
        assert f"top-{n_top} images: {shares}" in html.unescape(row)
    assert f"top-{TOP_K} images (highest value, each image once); up to {N_SHOWN} are shown" in page


# ------------------------------------------------------------------------------------------------------------
# The tables' latents: rendered and linked
# ------------------------------------------------------------------------------------------------------------


def test_every_latent_the_class_table_and_probe_name_is_rendered(planted, made):
    dump_to, result, page = made
    assoc = json.loads((dump_to / "association.json").read_text())
    named = {
        e["latent"] for best in assoc["top_latents_per_class"].values() for e in best[: render.CLASS_TABLE_LATENTS]
    }
    named |= {PLANTED, PROBE_ONLY}
    freq = topk_cache.read_cache(str(dump_to)).freq
    expected = {j for j in named if freq[j] > 0}
    assert PROBE_ONLY in expected and PLANTED in expected
    assert set(result.latents) == expected  # n_latents=0: nothing drawn, only what the tables name
    assert result.probe_json == os.path.join(os.path.dirname(planted[2]), "probes", "probe.json")
    links = set(re.findall(r'href="#latent-(\d+)"', page))
    assert {int(j) for j in links} == expected
    for latent in expected:
        assert f'id="latent-{latent}"' in page


def test_probe_section_lists_each_class_with_its_latent_ap_and_purity(made):
    _, _, page = made
    section = re.search(r'<table id="probe-classes">.*?</table>', page, re.S).group(0)
    rows = re.findall(r'<tr id="probe-(\w+)">(.*?)</tr>', section, re.S)
    assert [name for name, _ in rows] == ["sky", "grass", "water"]
    cells = {name: re.findall(r"<td[^>]*>(.*?)</td>", body) for name, body in rows}
    assert cells["grass"] == ["grass", f'<a href="#latent-{PLANTED}">{PLANTED}</a>', "1.000", "1.000", "23", "0.250"]
    assert cells["sky"][1:4] == [f'<a href="#latent-{PROBE_ONLY}">{PROBE_ONLY}</a>', "0.400", "0.500"]
    assert cells["water"][1:4] == ["–", "–", "–"]
    assert "mAP 0.700" in page and "Coverage@0.3 0.500" in page and "pca mAP 0.100" in page
    assert 'data-ap="1.0"' in rows_of(page)[PLANTED]


def test_a_probe_json_of_another_store_is_refused_when_named_and_left_out_otherwise(planted, tmp_path):
    root, store, ckpt, *_ = planted
    other = planted_probe("another-store")
    (tmp_path / "probe.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="another-store"):
        render.make_visuals(visuals_cfg(planted, tmp_path / "v", probe=str(tmp_path / "probe.json")), False)
    with pytest.raises(UserError, match="does not exist"):
        render.make_visuals(visuals_cfg(planted, tmp_path / "v", probe=str(tmp_path / "none.json")), False)


# ------------------------------------------------------------------------------------------------------------
# Outlines of the class mask
# ------------------------------------------------------------------------------------------------------------


def mask_edges(mask: np.ndarray, patch: float) -> set:
    """Every side of a masked patch whose neighbour is not masked, as ((x0, y0), (x1, y1)), computed plainly."""
    edges = set()
    for r in range(GRID):
        for c in range(GRID):
            if not mask[r, c]:
                continue
            x0, y0, x1, y1 = c * patch, r * patch, (c + 1) * patch, (r + 1) * patch
            if r == 0 or not mask[r - 1, c]:
                edges.add(((x0, y0), (x1, y0)))
            if r == GRID - 1 or not mask[r + 1, c]:
                edges.add(((x0, y1), (x1, y1)))
            if c == 0 or not mask[r, c - 1]:
                edges.add(((x0, y0), (x0, y1)))
            if c == GRID - 1 or not mask[r, c + 1]:
                edges.add(((x1, y0), (x1, y1)))
    return edges


def path_edges(d: str) -> set:
    found = set()
    for x, y, kind, length in re.findall(r"M([\d.]+) ([\d.]+)([hv])([\d.]+)", d):
        x, y, length = float(x), float(y), float(length)
        found.add(((x, y), (x + length, y)) if kind == "h" else ((x, y), (x, y + length)))
    return found


def test_the_probes_class_is_outlined_on_its_latents_heatmaps(planted, made):
    *_, patch_labels = planted
    dump_to, _, page = made
    meta = json.loads((dump_to / "neurons" / str(PLANTED) / "metadata.json").read_text())
    assert meta["outline"] == {"class": "grass", "source": "probe"}
    row = rows_of(page)[PLANTED]
    assert "outlined: grass (its probe's class)" in html.unescape(row)
    paths = dict(re.findall(rf'<path id="outline-{PLANTED}-(\d+)" d="([^"]*)"', row))
    assert sorted(int(r) for r in paths) == list(range(len(meta["image_indices"])))
    for rank, image in enumerate(meta["image_indices"]):
        mask = (patch_labels[image] == GRASS).reshape(GRID, GRID)
        assert path_edges(paths[str(rank)]) == mask_edges(mask, SIDE / GRID)
        assert f'<use href="#outline-{PLANTED}-{rank}"/>' in row  # the same outline over the original


def test_a_store_without_patch_labels_has_no_outlines(planted, tmp_path):
    _, store, _, acts, labels, _ = planted
    plain = write_store(
        str(tmp_path / "store"),
        acts,
        layers=(-1,),
        image_paths=store.image_paths(),
        labels=labels.tolist(),
        class_names=["bird", "cat"],
        image_root=store.metadata.image_root,
        vit_ckpt="saev-tiny-clip/none",
    )
    ckpt = identity_sae(tmp_path / "sae.pt", plain.path, D)
    cfg = visuals_cfg(planted, tmp_path / "v", ckpt=ckpt, data=config.VisualsDataConfig(plain.path, -1, "patches"))
    render.make_visuals(cfg, show_progress=False)
    page = (tmp_path / "v" / "index.html").read_text()
    assert 'class="outline"' not in page and 'id="outline"' not in page and 'id="probe-classes"' not in page
    # The completeness check (Dagster's visuals_complete) sees a missing original too.
    assert render.missing_images(str(tmp_path / "v")) == []
    victim = sorted((tmp_path / "v" / "originals").iterdir())[0]
    victim.unlink()
    assert render.missing_images(str(tmp_path / "v")) == [f"missing {victim}"]


# ------------------------------------------------------------------------------------------------------------
# In Chromium: the controls and the links
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    yield from chromium_or_skip("; the page is not checked in a browser")


VISIBLE = "(sel) => Array.from(document.querySelectorAll(sel)).filter(e => e.getClientRects().length > 0).length"


def count_visible(tab, selector: str) -> int:
    return tab.js(f"({VISIBLE})({json.dumps(selector)})")


def test_overlay_original_and_outline_toggles_in_chromium(browser, made):
    dump_to, result, _ = made
    tab = browser.open((dump_to / "index.html").as_uri())
    assert [src for src, width in tab.images() if width <= 0] == []
    assert [u for u in tab.requested_urls() if not u.startswith("file://")] == []
    n = result.n_heatmaps
    assert count_visible(tab, ".pic.heat") == n and count_visible(tab, ".pic.plain") == n
    assert count_visible(tab, "svg.outline") > 0
    # Heatmap and original share one scale: the same width, the picture part the same height.
    same = tab.js(
        "Array.from(document.querySelectorAll('#latents figure')).every(f => {"
        " const h = f.querySelector('.heat img').getBoundingClientRect();"
        " const p = f.querySelector('.plain img').getBoundingClientRect();"
        " return Math.abs(h.width - p.width) < 1.5 && p.height <= h.height; })"
    )
    assert same

    tab.click("#overlay")  # overlay off: the originals alone
    assert count_visible(tab, ".pic.heat") == 0 and count_visible(tab, ".pic.plain") == n
    tab.click("#beside")  # still only the originals, once each
    assert count_visible(tab, ".pic.heat") == 0 and count_visible(tab, ".pic.plain") == n
    tab.click("#overlay")  # overlay on, originals not beside: heatmaps alone
    assert count_visible(tab, ".pic.heat") == n and count_visible(tab, ".pic.plain") == 0
    tab.click("#beside")
    assert count_visible(tab, ".pic.plain") == n

    before = count_visible(tab, "svg.outline")
    tab.click("#outline")
    assert before > 0 and count_visible(tab, "svg.outline") == 0
    tab.click("#outline")
    assert count_visible(tab, "svg.outline") == before

    height = "document.querySelector('.pic.heat img').getBoundingClientRect().height"
    medium = tab.js(height)
    tab.js(
        "(() => { const s = document.getElementById('size'); s.value = 'l'; s.dispatchEvent(new Event('change')); })()"
    )
    assert tab.js(height) > medium * 1.5
    assert tab.errors() == []


def test_every_table_link_leads_to_its_row_in_chromium(browser, made):
    dump_to, _, _ = made
    tab = browser.open((dump_to / "index.html").as_uri())
    targets = tab.js(
        "Array.from(document.querySelectorAll('#classes a, #probe-classes a')).map(a => a.getAttribute('href'))"
    )
    assert targets and all(t.startswith("#latent-") for t in targets)
    assert tab.js(f"{json.dumps(targets)}.every(t => document.getElementById(t.slice(1)) !== null)")
    tab.click(f'#probe-classes a[href="#latent-{PROBE_ONLY}"]')
    assert tab.js("location.hash") == f"#latent-{PROBE_ONLY}"
    top = tab.js(f"document.getElementById('latent-{PROBE_ONLY}').getBoundingClientRect().top")
    assert 0 <= top < tab.js("window.innerHeight")
    # And back: a row's "best for <class>" leads to that class's probe row.
    back = tab.js("Array.from(document.querySelectorAll('#latents a[href^=\"#probe-\"]')).map(a => a.hash)")
    assert sorted(back) == ["#probe-grass", "#probe-sky"]
    tab.click('#latents a[href="#probe-grass"]')
    assert tab.js("document.querySelector(':target').id") == "probe-grass"
    assert tab.errors() == []
