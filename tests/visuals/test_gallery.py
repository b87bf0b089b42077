"""The gallery page: self-contained, escaped, sortable, and it really works in a browser.

The browser tests drive headless Chromium through the DevTools protocol over a pipe (``--remote-debugging-pipe``:
NUL-separated JSON on file descriptors 3 and 4), with the standard library only: no playwright, no websocket, no
port. They are skipped only when /usr/bin/chromium is absent."""

import html.parser
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from saev_core.visuals.gallery import freq_vs_value_png, image_relpath, preview_grid, write_gallery
from saev_core.visuals.heatmaps import ViewGeometry, overlay_heatmap, save_png
from tests.browser import chromium_or_skip

N_LATENTS, N_PER_LATENT = 18, 3
NASTY_LABELS = ['<script>alert("x")</script>', "a & b", "o'clock", "tabby cat"]
RANGE_RGB = (214, 39, 40)  # matplotlib's tab:red, the gallery's colour for the selected ranges


def make_latents(root, seed=0):
    """Render real heatmaps for N_LATENTS latents (random images, random activations) and return their entries."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(4096, size=N_LATENTS, replace=False)
    freqs = rng.permutation(np.linspace(-4, -1, N_LATENTS))  # distinct, so every sort has one right answer
    means = rng.permutation(np.linspace(-1, 1.5, N_LATENTS))
    latents = []
    for latent, freq, mean in zip(ids, freqs, means):
        latent = int(latent)
        values = rng.exponential(1.0, (N_PER_LATENT, 49))
        images, labels = [], []
        for rank in range(N_PER_LATENT):
            width, height = int(rng.integers(60, 120)), int(rng.integers(60, 120))
            img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            box = ViewGeometry(resize=224, crop=224).crop_box(width, height)
            rel = image_relpath(latent, rank)
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            save_png(overlay_heatmap(img, values[rank], (7, 7), box, vmax=float(values.max())), os.path.join(root, rel))
            images.append(rel)
            labels.append(NASTY_LABELS[(latent + rank) % len(NASTY_LABELS)])
        with open(os.path.join(root, "neurons", str(latent), "metadata.json"), "w") as f:
            json.dump({"latent": latent}, f)
        edges = np.linspace(-2, 1, 21)
        latents.append(
            {
                "latent": latent,
                "log10_freq": float(freq),
                "log10_mean_value": float(mean),
                "max_value": float(values.max()),
                "n_heatmaps": N_PER_LATENT,
                "images": images,
                "labels": labels,
                "hist_counts": rng.integers(0, 50, 20),
                "hist_edges": edges,
            }
        )
    return latents


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gallery"))
    latents = make_latents(root)
    rng = np.random.default_rng(1)
    path = write_gallery(
        root,
        latents,
        rng.uniform(-5, 0, 500),
        rng.normal(0, 1, 500),
        log_freq_range=(-3.5, -1.5),
        log_value_range=(-0.5, None),
    )
    return root, path, latents


class PageParser(html.parser.HTMLParser):
    """Every tag with its attributes, the rows' image sources, and the text of figcaptions."""

    def __init__(self):
        super().__init__()
        self.tags, self.rows, self.captions, self._in_caption = [], {}, [], False
        self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "tr" and "data-latent" in attrs:
            self._row = int(attrs["data-latent"])
            self.rows[self._row] = []
        if tag == "tr" and "data-of" in attrs:  # the row of a latent's pictures, under its numbers
            self._row = int(attrs["data-of"])
        if tag == "img" and self._row is not None:
            self.rows[self._row].append(attrs["src"])
        self._in_caption = tag == "figcaption"

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions.append(data)


def parse(path) -> PageParser:
    parser = PageParser()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    return parser


# ------------------------------------------------------------------------------------------------------------
# The page as a file
# ------------------------------------------------------------------------------------------------------------


def test_page_refers_only_to_files_inside_the_gallery(gallery):
    root, path, _ = gallery
    assert path == os.path.join(root, "index.html")
    page = parse(path)
    refs = [(tag, a[attr]) for tag, a in page.tags for attr in ("src", "href") if attr in a]
    assert refs
    for tag, ref in refs:
        assert ":" not in ref and not ref.startswith("/"), (tag, ref)  # relative: no scheme, no host
        target = os.path.realpath(os.path.join(root, ref))
        assert target.startswith(os.path.realpath(root)) and os.path.exists(target), (tag, ref)
    assert not [t for t, a in page.tags if t == "link" or (t == "script" and "src" in a)]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert "http:" not in text and "https:" not in text and "@import" not in text and "url(" not in text


def test_labels_are_escaped_and_shown_verbatim(gallery):
    _, path, latents = gallery
    page = parse(path)
    assert [t for t, _ in page.tags].count("script") == 1  # the page's own; no label became a tag
    expected = [label for entry in latents for label in entry["labels"]]
    assert page.captions == expected


def test_each_row_shows_its_latents_images_best_first(gallery):
    _, path, latents = gallery
    rows = parse(path).rows
    assert list(rows) == [e["latent"] for e in latents]
    for entry in latents:
        assert rows[entry["latent"]] == [f"neurons/{entry['latent']}/{rank}.png" for rank in range(N_PER_LATENT)]


def range_pixels(png: bytes) -> int:
    import io

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - RANGE_RGB).sum(axis=-1) <= 12).sum())


def test_scatter_draws_the_selected_ranges_only_when_given(gallery):
    root, _, _ = gallery
    rng = np.random.default_rng(2)
    freq, value = rng.uniform(-5, 0, 300), rng.normal(0, 1, 300)
    shown = np.stack([freq[:5], value[:5]], axis=1)
    plain = freq_vs_value_png(freq, value, shown)
    ranged = freq_vs_value_png(freq, value, shown, log_freq_range=(-4.0, -2.0), log_value_range=(-1.0, 1.0))
    assert range_pixels(plain) == 0
    assert range_pixels(ranged) > 500  # four lines across the plot
    with open(os.path.join(root, "freq_vs_value.png"), "rb") as f:
        assert range_pixels(f.read()) > 300  # the gallery's own: three bounds given


def test_rewriting_the_page_leaves_no_temporary_files(gallery, tmp_path):
    root, _, latents = gallery
    shutil.copytree(root, tmp_path / "g")
    for _ in range(2):
        write_gallery(tmp_path / "g", latents, np.zeros(3), np.zeros(3))
    assert sorted(os.listdir(tmp_path / "g")) == ["freq_vs_value.png", "index.html", "neurons"]


def test_missing_images_and_mismatched_labels_are_refused(gallery, tmp_path):
    root, _, latents = gallery
    entry = dict(latents[0])
    with pytest.raises(FileNotFoundError, match="render the heatmaps"):
        write_gallery(tmp_path, [entry], np.zeros(1), np.zeros(1))
    entry["labels"] = entry["labels"][:-1]
    with pytest.raises(ValueError, match="one label per rendered image"):
        write_gallery(root, [entry], np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="unique"):
        write_gallery(root, [latents[0], latents[0]], np.zeros(1), np.zeros(1))


def test_preview_grid_puts_each_latents_top_images_in_its_row(tmp_path):
    import io

    colours = {
        (7, 0): (255, 0, 0),
        (7, 1): (0, 255, 0),
        (42, 0): (0, 0, 255),
        (42, 1): (255, 255, 0),
        (9, 0): (255, 0, 255),
    }  # latent 9 has no rank-1 image
    for (latent, rank), colour in colours.items():
        os.makedirs(tmp_path / "neurons" / str(latent), exist_ok=True)
        Image.new("RGB", (90, 60), colour).save(tmp_path / image_relpath(latent, rank))
    grid = np.asarray(Image.open(io.BytesIO(preview_grid(tmp_path, [7, 42, 9], 2, thumb=32))).convert("RGB"))

    centres = {}
    for key, colour in colours.items():
        ys, xs = np.nonzero((grid == colour).all(axis=-1))
        assert ys.size >= 32 * 21 - 2 * 32, key  # a 32x21 thumbnail (90x60 fit into 32 px)
        assert xs.max() - xs.min() + 1 == 32 and ys.max() - ys.min() + 1 in (21, 22), key
        centres[key] = (ys.mean(), xs.mean())
    assert centres[(7, 0)][0] == centres[(7, 1)][0] < centres[(42, 0)][0] == centres[(42, 1)][0] < centres[(9, 0)][0]
    assert centres[(7, 0)][1] == centres[(42, 0)][1] == centres[(9, 0)][1] < centres[(7, 1)][1]
    assert ((grid == (200, 200, 200)).all(axis=-1)).sum() >= 32 * 32  # the missing image's grey square


# ------------------------------------------------------------------------------------------------------------
# The page in a browser
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    yield from chromium_or_skip("; the page is not checked in a browser")


def test_browser_harness_catches_remote_requests_console_errors_and_broken_images(browser, tmp_path):
    """The checks below can fail: a page that breaks each rule is caught."""
    Image.new("RGB", (4, 4), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.html").write_text(
        '<img src="ok.png"><img src="missing.png">'
        '<img src="http://example.invalid/remote.png">'
        '<script>console.error("boom")</script>'
    )
    tab = browser.open((tmp_path / "bad.html").as_uri())
    assert [u for u in tab.requested_urls() if not u.startswith("file://")] == ["http://example.invalid/remote.png"]
    assert any("boom" in e for e in tab.errors())
    assert dict(tab.images()) == {"ok.png": 4, "missing.png": 0, "http://example.invalid/remote.png": 0}


def test_gallery_in_chromium_loads_every_image_sorts_on_click_and_stays_local(browser, gallery):
    root, path, latents = gallery
    tab = browser.open("file://" + path)

    images = tab.images()
    assert len(images) == N_LATENTS * N_PER_LATENT + 1  # + the scatter plot
    assert [src for src, width in images if width <= 0] == []

    urls = tab.requested_urls()
    assert [u for u in urls if not u.startswith("file://")] == []
    gallery_files = {f"file://{root}/{e['images'][r]}" for e in latents for r in range(N_PER_LATENT)}
    assert gallery_files <= set(urls)  # the request log saw every image, so it would have seen a remote one

    assert tab.row_order() == [e["latent"] for e in latents]  # as given, before any click
    by = {
        key: [e["latent"] for e in sorted(latents, key=lambda e: e[key])]
        for key in ("log10_freq", "log10_mean_value", "latent")
    }
    tab.click('th[data-key="freq"]')
    assert tab.row_order() == by["log10_freq"]
    tab.click('th[data-key="freq"]')
    assert tab.row_order() == by["log10_freq"][::-1]
    tab.click('th[data-key="mean"] button')
    assert tab.row_order() == by["log10_mean_value"]
    tab.click('th[data-key="latent"]')
    assert tab.row_order() == by["latent"]
    # The rows moved with their images: each row still shows its own latent's files.
    first = tab.js(
        "Array.from(document.querySelectorAll('#latents tbody tr:nth-child(2) img')).map(i => i.getAttribute('src'))"
    )
    assert first == [image_relpath(by["latent"][0], r) for r in range(N_PER_LATENT)]

    assert tab.errors() == []
