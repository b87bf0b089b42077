"""The explorer app, started as its own process on 127.0.0.1 and driven in headless Chromium (Debian's, through the
DevTools protocol harness of test_gallery): browse a latent, sort the latents (best AP when the member has patch
probes, class selectivity otherwise), explain an upload (previewed; a new upload replaces it) and jump to a latent,
refuse a bad upload with a message, open another sweep member; no request may leave 127.0.0.1, and every process
started here is stopped by its PID. The data side's orders are checked against a plain re-computation from the files.
Screenshots go to $SAEV_SCREENSHOTS when set."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saev_core import config, explorer
from saev_core.__main__ import main
from saev_core.analysis.inference import explain
from saev_core.errors import UserError
from saev_core.pipeline import stages
from saev_core.pipeline.file import Pipeline, ReportPlan
from saev_core.train import trainer
from saev_core.visuals import render, topk_cache
from tests.browser import chromium_or_skip
from tests.helpers import activations_argv, write_images
from tests.processes import free_port, stop_group

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDE = dict(log_freq_range=(-10.0, 0.0), log_value_range=(-10.0, 10.0))


def write_seg_folder(root, n: int) -> None:
    """``write_images``' images (classes cat and dog by folder) in ADE20K's layout, each with a mask: a band of
    "sky" (1) across the top third, a "grass" (2) block at a place that depends on the image, the rest unlabelled."""
    rels = write_images(root / "images", n, size=(64, 48))
    (root / "classes.txt").write_text("sky\ngrass\n")
    for i, rel in enumerate(rels):
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[:16] = 1
        mask[24:40, (i * 7) % 40 : (i * 7) % 40 + 24] = 2
        path = root / "annotations" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, mode="L").save(path)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_clip_ckpt):
    """A tiny store with image classes and patch labels, a sweep of two members trained together, visuals of the
    first member only (pipeline layout: <vis>/layer_-1/<member_id>), its patch probes beside its checkpoint
    (<member folder>/probes/probe.json), and the sweep's controls (sweep.csv's columns and controls.json)."""
    root = tmp_path_factory.mktemp("explorer")
    write_seg_folder(root / "seg", 16)
    argv = activations_argv(
        tiny_clip_ckpt, root / "seg", root / "acts", "--vit-layers", "-1", data_kind="seg-folder-dataset"
    )
    assert main(argv) == 0
    store = str(next(p for p in (root / "acts").iterdir() if p.is_dir()))
    cfgs = [
        config.TrainConfig(
            data=config.DataLoadConfig(shard_root=store, layer=-1, val_frac=0.25),
            sae=config.SparseAutoencoderConfig(d_vit=64, exp_factor=2, arch="topk", k=k, seed=k),
            n_patches=40 * 64,
            sae_batch_size=64,
            n_lr_warmup=5,
            ckpt_path=str(root / "ckpts"),
            device="cpu",
            log_every=1000,
        )
        for k in (4, 8)
    ]
    first, second = trainer.train_sweep(cfgs, show_progress=False)
    folder = str(root / "vis" / "layer_-1" / first.member_id)
    render.make_visuals(
        config.VisualsConfig(ckpt=first.ckpt_path, dump_to=folder, top_k=8, n_imgs_per_latent=4, device="cpu", **WIDE),
        show_progress=False,
    )
    probes = os.path.join(os.path.dirname(first.ckpt_path), "probes")
    assert main(["probe", "--ckpt", first.ckpt_path, "--dump-to", probes, "--k", "5", "--device", "cpu"]) == 0
    pipe = Pipeline(str(root / "pipeline.toml"), config.ActivationsConfig(), report=ReportPlan(kmeans=False))
    stages.layer_controls(pipe, str(root / "ckpts" / "sweep.csv"), fresh=True)
    return root, folder, first, second


@pytest.fixture
def launch(sweep, tmp_path):
    """Start `python -m saev_core explore` (its own process group) on a free port; every app started is stopped by
    its PID at the end. Returns (port, log path)."""
    root, folder, *_ = sweep
    started = []

    def start(*extra: str) -> tuple[int, object]:
        port = free_port()
        log_path = tmp_path / f"explore-{port}.log"
        log = open(log_path, "wb")
        env = {**os.environ, "PYTHONPATH": REPO, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "saev_core",
                "explore",
                "--visuals",
                folder,
                "--sweep",
                str(root / "ckpts"),
                "--port",
                str(port),
                "--device",
                "cpu",
                *extra,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append((proc, log))
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return port, log_path
            except OSError:
                pass
            assert time.monotonic() < deadline, "the explorer did not answer within 90 s"
            time.sleep(0.3)

    yield start
    for proc, log in started:
        stop_group(proc, wait_s=15)
        log.close()


@pytest.fixture
def browser():
    yield from chromium_or_skip()


def wait_for(tab, expression: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := tab.js(expression)):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.2)
    return value


def loaded_images(selector: str) -> str:
    return (
        f"Array.from(document.querySelectorAll('{selector} img')).filter(i => i.complete && i.naturalWidth > 0).length"
    )


def text(selector: str) -> str:
    return f"(document.querySelector('{selector}') || {{innerText: ''}}).innerText"


def upload(browser, tab, path: str) -> None:
    """Put a file in the upload button's file input, as a user picking it in the button's dialog would."""
    root = browser.call("DOM.getDocument", {"depth": 0}, session=tab.session)["root"]["nodeId"]
    node = browser.call(
        "DOM.querySelector", {"nodeId": root, "selector": "#upload-column input[type=file]"}, session=tab.session
    )["nodeId"]
    browser.call("DOM.setFileInputFiles", {"files": [path], "nodeId": node}, session=tab.session)


def screenshot(browser, tab, name: str) -> None:
    folder = os.environ.get("SAEV_SCREENSHOTS")
    if folder:
        shot = browser.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=tab.session
        )
        with open(os.path.join(folder, f"explorer-{name}.png"), "wb") as f:
            f.write(base64.b64decode(shot["data"]))


def expected_order(folder: str, ckpt: str, key: str) -> list[int]:
    """The latent table's order re-computed from the files alone: the cache's frequencies, association.npz's AUROC
    matrix (best over the classes, dense latents after the others) and probe.json's per-class rows (a latent's
    highest AP among the classes it is best for); larger first, latents without a value last, ties by id."""
    with np.load(os.path.join(folder, "cache", "topk.npz")) as z:
        freq = z["freq"]
    alive = [int(j) for j in np.flatnonzero(freq > 0)]
    if key == "class selectivity":
        with np.load(os.path.join(folder, "cache", "association.npz")) as z:
            auroc = z["auroc"]
        best = {j: max((a for a in auroc[:, j] if not np.isnan(a)), default=None) for j in alive}
        return sorted(alive, key=lambda j: (freq[j] > 0.01, best[j] is None, -(best[j] or 0), j))
    assert key == "best AP"
    doc = json.loads(Path(os.path.dirname(ckpt), "probes", "probe.json").read_text())
    aps: dict[int, float] = {}
    for row in doc["classes"]:
        if row["ap"] is not None:
            aps[row["best_latent"]] = max(aps.get(row["best_latent"], -1.0), row["ap"])
    return sorted(alive, key=lambda j: (j not in aps, -aps.get(j, 0), j))


IDS = (
    "Array.from(document.querySelectorAll(\"#latent-table [role=gridcell][data-col='0']\"))"
    ".sort((a, b) => a.dataset.row - b.dataset.row).map(c => +c.innerText)"
)
"""The latent ids of the table's rows that are drawn (Gradio's table draws the rows in view), top first."""


def table_ids(tab) -> list[int]:
    return tab.js(IDS)


def first_row_is(latent: int) -> str:
    return f"{IDS}[0] === {latent}"


def test_explorer_in_chromium_browses_sorts_explains_opens_members_and_stays_local(sweep, launch, browser, tmp_path):
    root, folder, first, second = sweep
    port, log = launch()
    origin = f"http://127.0.0.1:{port}/"
    tab = browser.open(origin)
    cache = topk_cache.read_cache(folder)

    # The member has patch probes: the latents come sorted by best AP, each with its patch class; class
    # selectivity is one click away.
    wait_for(tab, loaded_images("#latent-images"))
    assert tab.js("document.querySelector('#sort input:checked').value") == "best AP"
    by_ap = expected_order(folder, first.ckpt_path, "best AP")
    wait_for(tab, first_row_is(by_ap[0]))
    assert table_ids(tab) == by_ap[: len(table_ids(tab))] and len(table_ids(tab)) >= min(len(by_ap), 5)
    best = json.loads(Path(os.path.dirname(first.ckpt_path), "probes", "probe.json").read_text())["classes"]
    assert f"{best[0]['class']} (" in tab.js(text("#latent-table"))
    wait_for(tab, f"{text('#latent-summary')}.includes('Latent {by_ap[0]}')")
    assert "Patch probes" in tab.js(text("#latent-summary"))
    screenshot(browser, tab, "latents-best-ap")
    tab.click("#sort input[value='class selectivity']")
    by_auroc = expected_order(folder, first.ckpt_path, "class selectivity")
    wait_for(tab, first_row_is(by_auroc[0]))
    assert table_ids(tab) == by_auroc[: len(table_ids(tab))]
    banner = tab.js(text("#banner"))
    assert "dead in training" in banner and "frac_dead_train" in banner and "fire on at least one" in banner

    # Pick a latent (not the one shown first): its images load, its numbers are shown.
    alive = np.flatnonzero(cache.freq > 0)
    latent = int(alive[np.argmin(cache.freq[alive])])
    tab.js("(() => { const i = document.querySelector('#latent-id input'); i.focus(); i.select(); })()")
    browser.call("Input.insertText", {"text": str(latent)}, session=tab.session)
    tab.click("#show-latent")
    wait_for(tab, f"{text('#latent-summary')}.includes('Latent {latent}')")
    n = min(explorer.N_IMAGES_SHOWN, int(cache.n_images()[latent]))
    wait_for(tab, f"{loaded_images('#latent-images')} === {n}")
    wait_for(tab, loaded_images("#latent-hist"))
    screenshot(browser, tab, "latent")

    # A bad upload: a message in the page, no trace, no preview.
    tab.click("button[data-tab-id=explain]")
    wait_for(tab, "!!document.querySelector('#upload-column input[type=file]')")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    upload(browser, tab, str(bad))
    status = wait_for(tab, f"{text('#explain-status')}.includes('Cannot read') && {text('#explain-status')}")
    assert "broken.png" in status and "not an image" in status and "Traceback" not in status
    assert tab.js(loaded_images("#upload-preview")) == 0
    screenshot(browser, tab, "bad-upload")

    # Upload an image (no "Clear" first): it is previewed, and its strongest latents, as the library computes
    # them, are drawn as heatmaps.
    def explain_upload(path: str, size: tuple[int, int]) -> list[int]:
        upload(browser, tab, path)
        name = os.path.basename(path)
        preview = "document.querySelector('#upload-preview img')"
        wait_for(tab, f"{preview} && {preview}.complete && {preview}.naturalWidth === {size[0]}")
        assert tab.js(f"{preview}.naturalHeight") == size[1]
        wait_for(tab, f"{text('#explain-status')}.includes('{name}: its')", timeout=120)
        expected = explain([path], first.ckpt_path, top_n=8, device="cpu")
        want = [int(j) for j, v in zip(expected.top_latents[0], expected.top_values[0]) if v > 0]
        wait_for(tab, f"{loaded_images('#explain-images')} === {len(expected.top_latents[0])}")
        wait_for(tab, f"document.querySelectorAll('#jump-pick input').length === {len(want)}")
        shown = tab.js("Array.from(document.querySelectorAll('#jump-pick input')).map(i => +i.value)")
        assert shown == want
        return want

    explain_upload(str(root / "seg" / "images" / "cat" / "img001.png"), (64, 48))
    screenshot(browser, tab, "explain")
    # ... and a second upload replaces the first: its own preview, its own latents.
    other = tmp_path / "other.png"
    Image.open(root / "seg" / "images" / "dog" / "img000.png").resize((96, 72)).save(other)
    want = explain_upload(str(other), (96, 72))
    assert "img001" not in tab.js(text("#explain-status"))
    screenshot(browser, tab, "explain-replaced")

    # ... then jump to one of them: the Latents tab opens on it.
    tab.click(f"#jump-pick input[value='{want[0]}']")
    wait_for(tab, "document.querySelector('button[data-tab-id=latents]').getAttribute('aria-selected') === 'true'")
    wait_for(tab, f"{text('#latent-summary')}.includes('Latent {want[0]}')")
    wait_for(tab, loaded_images("#latent-images"))

    # The sweep: the PCA curve beside the members, the controls in the table.
    tab.click("button[data-tab-id=sweep]")
    wait_for(tab, f"!!document.querySelector(\"#member-pick input[value='{second.member_id}']\")")
    wait_for(tab, loaded_images("#sweep-plot"))
    assert "with the PCA baseline" in tab.js(text("#sweep-plot-caption"))
    headers = tab.js(text("#sweep-table thead"))
    for column in ("pca_nmse_at_l0", "random_nmse_at_l0", "gain_vs_pca", "gain_vs_random"):
        assert column in headers
    screenshot(browser, tab, "sweep")

    # Open the other sweep member: its visuals are rendered beside the first's and its latents shown, sorted by
    # class selectivity (it has no patch probes).
    tab.click(f"#member-pick input[value='{second.member_id}']")
    tab.click("#open-member")
    wait_for(tab, f"{text('#banner')}.includes('{second.member_id}')", timeout=90)
    wait_for(tab, "document.querySelector('button[data-tab-id=latents]').getAttribute('aria-selected') === 'true'")
    wait_for(tab, loaded_images("#latent-images"))
    other_folder = os.path.join(os.path.dirname(folder), second.member_id)
    assert topk_cache.read_cache(other_folder).identity.sae_sha256 == topk_cache.file_sha256(second.ckpt_path)
    wait_for(tab, "document.querySelector('#sort input:checked').value === 'class selectivity'")
    assert not tab.js("!!document.querySelector(\"#sort input[value='best AP']\")")
    by_auroc = expected_order(other_folder, second.ckpt_path, "class selectivity")
    wait_for(tab, first_row_is(by_auroc[0]))
    assert table_ids(tab) == by_auroc[: len(table_ids(tab))]
    wait_for(tab, f"{text('#latent-summary')}.includes('Latent {by_auroc[0]}')")
    wait_for(tab, loaded_images("#latent-images"))
    screenshot(browser, tab, "member")

    requests = tab.requested_urls() + [e["url"] for e in tab.events("Network.webSocketCreated")]
    assert any(u.startswith(origin) for u in requests)
    assert [u for u in requests if not u.startswith((origin, "data:", "blob:"))] == []
    assert "Traceback" not in log.read_text()


def test_the_page_says_when_the_checkpoint_is_not_the_caches_sae(sweep, launch, browser):
    root, folder, first, second = sweep
    port, log = launch("--ckpt", second.ckpt_path)
    tab = browser.open(f"http://127.0.0.1:{port}/")
    banner = wait_for(tab, f"{text('#banner')}.includes('another SAE') && {text('#banner')}")
    assert second.ckpt_path in banner
    wait_for(tab, loaded_images("#latent-images"))  # browsing the cache still works
    tab.click("button[data-tab-id=explain]")
    wait_for(tab, "!!document.querySelector('#upload-column input[type=file]')")
    upload(browser, tab, os.path.join(root, "seg", "images", "dog", "img000.png"))
    wait_for(tab, f"{text('#explain-status')}.includes('another SAE')")
    screenshot(browser, tab, "wrong-ckpt")
    assert "Traceback" not in log.read_text()


def test_a_cache_of_another_sae_and_a_missing_checkpoint_are_explained(sweep, tmp_path):
    _, folder, first, second = sweep
    assert explorer.LatentBook(folder).ckpt_problem is None  # selection.json names the right checkpoint
    problem = explorer.LatentBook(folder, second.ckpt_path).ckpt_problem
    assert "another SAE" in problem and second.ckpt_path in problem
    assert "does not exist" in explorer.LatentBook(folder, str(tmp_path / "nope.pt")).ckpt_problem


def test_latents_sort_by_each_key_as_a_plain_sort_does(sweep):
    _, folder, first, _ = sweep
    book = explorer.LatentBook(folder)
    alive = [int(i) for i in np.flatnonzero(book.cache.freq > 0)]
    assert book.order("id") == alive
    assert book.order("frequency") == sorted(alive, key=lambda i: (-book.cache.freq[i], i))
    assert book.order("mean value") == sorted(alive, key=lambda i: (-book.cache.mean_value[i], i))
    assert book.order("max value") == sorted(alive, key=lambda i: (-book.cache.top_values[i, 0], i))
    for key in ("class selectivity", "best AP"):
        assert book.order(key) == expected_order(folder, first.ckpt_path, key)
    assert book.sort_keys() == list(explorer.SORT_KEYS) and book.default_sort() == "best AP"
    table = book.table("best AP")
    assert list(table["latent"]) == book.order("best AP")[: explorer.N_TABLE_ROWS]
    assert list(table.columns)[-2:] == ["best class (AUROC)", "patch class (AP)"]


def member_copy(tmp_path, folder: str, ckpt: str) -> tuple[Path, Path]:
    """The visuals folder and the checkpoint copied under tmp_path (a member folder of its own), so a test can put
    its own probe.json and metrics.json beside the checkpoint."""
    import shutil

    member = tmp_path / "member"
    member.mkdir()
    shutil.copy(ckpt, member / "sae.pt")
    shutil.copytree(folder, tmp_path / "visuals")
    return tmp_path / "visuals", member / "sae.pt"


def test_best_ap_is_each_latents_best_class_from_a_planted_probe_json(sweep, tmp_path):
    """A planted probe.json: a latent best for two classes keeps the higher AP; a class without an AP and a latent
    out of range count for nothing; a negative weight is called inverse; the order is by AP, the rest by id."""
    _, folder, first, _ = sweep
    visuals, ckpt = member_copy(tmp_path, folder, first.ckpt_path)
    alive = [int(j) for j in np.flatnonzero(topk_cache.read_cache(folder).freq > 0)]
    a, b, c = alive[-1], alive[0], alive[1]
    rows = [
        {"class": "sky", "best_latent": a, "ap": 0.4, "purity_at_k": 0.5, "weight": 2.0},
        {"class": "grass", "best_latent": b, "ap": 0.9, "purity_at_k": 1.0, "weight": 1.0},
        {"class": "road", "best_latent": a, "ap": 0.7, "purity_at_k": 0.75, "weight": -3.0},
        {"class": "tree", "best_latent": c, "ap": None, "purity_at_k": None, "weight": 0.0},
        {"class": "wall", "best_latent": 10**6, "ap": 0.99, "purity_at_k": 1.0, "weight": 1.0},
    ]
    d_sae = topk_cache.read_cache(folder).d_sae
    doc = {"ckpt": str(ckpt), "width": d_sae, "k": 7, "classes": rows}
    (ckpt.parent / "probes").mkdir()
    (ckpt.parent / "probes" / "probe.json").write_text(json.dumps(doc))
    book = explorer.LatentBook(str(visuals), str(ckpt))
    assert book.ckpt_problem is None and book.probes is not None
    assert book.order("best AP") == [b, a, *[j for j in alive if j not in (a, b)]]
    table = book.table("best AP").set_index("latent")["patch class (AP)"]
    assert table[b] == "grass (0.90)" and table[a] == "road (0.70, inverse)" and table[c] == ""
    summary = book.summary(a)
    assert "sky: AP 0.40, Purity@7 0.50" in summary and "road: AP 0.70, Purity@7 0.75 (inverse" in summary

    # Probes of an SAE of another width, or of another existing checkpoint, are left out with a note.
    for change, note in ((dict(width=d_sae + 1), "wide"), (dict(ckpt=first.ckpt_path), "another checkpoint")):
        (ckpt.parent / "probes" / "probe.json").write_text(json.dumps({**doc, **change}))
        other = explorer.LatentBook(str(visuals), str(ckpt))
        assert other.probes is None and "best AP" not in other.sort_keys() and note in " ".join(other.notes)
        assert other.default_sort() == "class selectivity"
    (ckpt.parent / "probes" / "probe.json").write_text("{not json")
    damaged = explorer.LatentBook(str(visuals), str(ckpt))
    assert damaged.probes is None and "cannot be read" in damaged.notes[0]


def test_the_banner_keeps_firing_apart_from_dead_in_training(sweep, tmp_path):
    _, folder, first, _ = sweep
    visuals, ckpt = member_copy(tmp_path, folder, first.ckpt_path)
    cache = topk_cache.read_cache(folder)
    n_fire = int((cache.freq > 0).sum())
    words = explorer.LatentBook(str(visuals), str(ckpt)).describe()
    assert f"{n_fire} fire on at least one of the store's images" in words and "dead" not in words
    metrics = {"frac_dead_train": 0.125, "n_dead_train": 16, "dead_window": 4096}
    (ckpt.parent / "metrics.json").write_text(json.dumps(metrics))
    words = explorer.LatentBook(str(visuals), str(ckpt)).describe()
    assert "dead in training:** 12.5% (16 latents) did not fire in the last 4,096 training vectors" in words
    assert "`frac_dead_train`, metrics.json" in words


def test_the_default_order_without_classes_or_probes_is_by_id(sweep, tmp_path):
    _, folder, first, _ = sweep
    visuals, ckpt = member_copy(tmp_path, folder, first.ckpt_path)
    os.remove(visuals / "cache" / "association.npz")
    book = explorer.LatentBook(str(visuals), str(ckpt))
    assert book.sort_keys() == ["frequency", "mean value", "max value", "id"] and book.default_sort() == "id"
    with pytest.raises(UserError, match="no classes"):
        book.order("class selectivity")
    with pytest.raises(UserError, match="no patch probes"):
        book.order("best AP")


def test_the_sweep_table_shows_the_controls_and_the_pca_curve(sweep):
    root, *_ = sweep
    table = explorer.SweepTable(str(root / "ckpts"))
    rows, cols = table.rows()
    assert cols[:2] == ["member_id", "sae.arch"]
    for column in ("pca_nmse_at_l0", "random_nmse_at_l0", "gain_vs_pca", "gain_vs_random", "frac_dead_train"):
        assert column in cols
    controls = json.loads((root / "ckpts" / "controls.json").read_text())
    assert table.pca_nmse == controls["pca_nmse"] and len(table.pca_nmse) == 64  # d_vit components
    assert table.plot(table.members[0]).size == (500, 360)


def test_loading_the_app_and_building_it_imports_no_torch(sweep):
    """Cold start: the CLI, the explorer and its built app import neither torch nor matplotlib; the cache is read
    when the page first asks for it, the ViT when an upload is explained."""
    root, folder, *_ = sweep
    code = (
        "import sys\n"
        "from saev_core import config\n"
        "import saev_core.__main__\n"
        "from saev_core.explorer import build_app\n"
        f"build_app(config.ExploreConfig(visuals={folder!r}, sweep={str(root / 'ckpts')!r}, device='cpu'))\n"
        "loaded = [m for m in ('torch', 'matplotlib', 'open_clip') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


CACHE_ARRAYS = ("top_values", "top_images", "top_patches", "top_cls", "freq", "mean_value", "hist")


def test_showing_a_latent_from_the_cache_imports_neither_torch_nor_scipy_and_reads_what_the_job_wrote(sweep, tmp_path):
    """What the first latent on screen needs (the cache, the association, the probes, the order, a rendered latent's
    table row, summary, heatmaps and histogram), read through the data side in a fresh process, imports neither torch
    nor scipy (nor open_clip); and what it read equals the npz files read here with numpy alone (the independent
    reference), and what the cache readers give in this process."""
    from saev_core.visuals import association_cache

    _, folder, first, _ = sweep
    chosen = json.loads(Path(folder, "cache", "selection.json").read_text())
    rendered, n_rendered = chosen["latents"][0], chosen["n_heatmaps"][0]
    out = tmp_path / "read.npz"
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from saev_core.explorer import LatentBook\n"
        f"book = LatentBook({folder!r})\n"
        "key = book.default_sort()\n"
        "order = book.order(key)\n"
        f"latent = book.check_latent({rendered})\n"
        f"pictures = book.images(latent, {n_rendered})\n"
        "book.table(key), book.summary(order[0]), book.summary(latent), book.histogram(latent)\n"
        f"arrays = {{name: getattr(book.cache, name) for name in {CACHE_ARRAYS!r}}}\n"
        f"np.savez({str(out)!r}, key=key, order=order, auroc=book.assoc.auroc, top_label_counts="
        "book.assoc.top_label_counts, pictures=np.stack([np.asarray(p) for p, _ in pictures]), **arrays)\n"
        "loaded = [m for m in ('torch', 'scipy', 'open_clip') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    with (
        np.load(out) as got,
        np.load(os.path.join(folder, "cache", "topk.npz")) as raw,
        np.load(os.path.join(folder, "cache", "association.npz")) as raw_assoc,
    ):
        job_cache, job_assoc = topk_cache.read_cache(folder), association_cache.load(folder)
        for name in CACHE_ARRAYS:
            np.testing.assert_array_equal(got[name], raw[name], err_msg=name)
            np.testing.assert_array_equal(got[name], getattr(job_cache, name), err_msg=name)
        for name in ("auroc", "top_label_counts"):
            np.testing.assert_array_equal(got[name], raw_assoc[name], err_msg=name)
            np.testing.assert_array_equal(got[name], getattr(job_assoc, name), err_msg=name)
        assert str(got["key"]) == "best AP"
        assert got["order"].tolist() == expected_order(folder, first.ckpt_path, "best AP")
        for rank, picture in enumerate(got["pictures"]):
            with Image.open(os.path.join(folder, "neurons", str(rendered), f"{rank}.png")) as png:
                np.testing.assert_array_equal(picture, np.asarray(png.convert("RGB")))


def test_a_member_id_that_leaves_its_folder_is_refused_in_the_page_and_nothing_is_written(sweep, tmp_path):
    """A hand-edited sweep.csv whose member id is ``../../escape``: "Open this member's latents" (the app's own
    handler, in-process) shows one message naming the id, and nothing appears outside the visuals folder."""
    import pandas as pd

    from saev_core.explorer.app import Explorer, build_app

    root, folder, first, second = sweep
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    table = pd.read_csv(root / "ckpts" / "sweep.csv", dtype={"member_id": str})
    table.loc[1, "member_id"] = "../../escape"
    table.to_csv(ckpts / "sweep.csv", index=False)
    visuals = Path(folder)
    cfg = config.ExploreConfig(visuals=folder, sweep=str(ckpts), device="cpu")

    def files() -> list[str]:
        return sorted(str(p) for p in [*tmp_path.rglob("*"), *root.rglob("*")])

    before = files()

    with pytest.raises(UserError, match=r"'\.\./\.\./escape'.*12 lowercase hex"):
        Explorer(cfg).member_book("../../escape")
    blocks = build_app(cfg)
    [open_member] = [f.fn for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == "open_member"]
    message, *_ = open_member("../../escape", progress=lambda *a, **k: None)
    assert message.startswith("⚠️") and "'../../escape'" in message and str(ckpts / "sweep.csv") in message
    assert files() == before
    # The folder rule on its own: a plain id goes beside the opened member, '../x' never resolves outside.
    assert explorer.member_visuals_folder(str(visuals), [first.member_id], "0123456789ab") == str(
        visuals.parent / "0123456789ab"
    )
    with pytest.raises(UserError, match="member id '../x'"):
        explorer.member_visuals_folder(str(visuals), [first.member_id], "../x")
