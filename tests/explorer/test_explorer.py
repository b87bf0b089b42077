"""The explorer app, started as its own process on 127.0.0.1 and driven in headless Chromium (Debian's, through the
DevTools protocol harness of test_gallery): browse a latent, explain an upload and jump to a latent, refuse a bad
upload with a message, open another sweep member; no request may leave 127.0.0.1, and every process started here
is stopped by its PID. Screenshots go to $SAEV_SCREENSHOTS when set."""

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from saev_core import config, explorer
from saev_core.__main__ import main
from saev_core.analysis.inference import explain
from saev_core.errors import UserError
from saev_core.train import trainer
from saev_core.visuals import render, top_images
from tests.browser import CHROMIUM, Chromium
from tests.helpers import write_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDE = dict(log_freq_range=(-10.0, 0.0), log_value_range=(-10.0, 10.0))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_clip_ckpt):
    """A tiny store, a sweep of two members trained together, and visuals of the first member only (pipeline
    layout: <vis>/layer_-1/<member_id>)."""
    root = tmp_path_factory.mktemp("explorer")
    write_images(root / "imgs", 16, size=(64, 48))
    assert (
        main(
            [
                "activations",
                "--vit-family",
                "clip",
                "--vit-ckpt",
                tiny_clip_ckpt,
                "--vit-layers",
                "-1",
                "--dump-to",
                str(root / "acts"),
                "--n-workers",
                "0",
                "data:image-folder-dataset",
                "--data.root",
                str(root / "imgs"),
            ]
        )
        == 0
    )
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
    return root, folder, first, second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    chromium = Chromium()
    yield chromium
    chromium.close()


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
    """Put a file in the upload's file input, as a user picking it would."""
    root = browser.call("DOM.getDocument", {"depth": 0}, session=tab.session)["root"]["nodeId"]
    node = browser.call(
        "DOM.querySelector", {"nodeId": root, "selector": "#upload input[type=file]"}, session=tab.session
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


def test_explorer_in_chromium_browses_explains_opens_members_and_stays_local(sweep, launch, browser, tmp_path):
    root, folder, first, second = sweep
    port, log = launch()
    origin = f"http://127.0.0.1:{port}/"
    tab = browser.open(origin)
    cache = top_images.read_cache(folder)

    # Pick a latent (not the one shown first): its images load, its numbers are shown.
    alive = np.flatnonzero(cache.freq > 0)
    latent = int(alive[np.argmin(cache.freq[alive])])
    wait_for(tab, loaded_images("#latent-images"))
    tab.js("(() => { const i = document.querySelector('#latent-id input'); i.focus(); i.select(); })()")
    browser.call("Input.insertText", {"text": str(latent)}, session=tab.session)
    tab.click("#show-latent")
    wait_for(tab, f"{text('#latent-summary')}.includes('Latent {latent}')")
    n = min(explorer.N_IMAGES_SHOWN, int(cache.n_images()[latent]))
    wait_for(tab, f"{loaded_images('#latent-images')} === {n}")
    wait_for(tab, loaded_images("#latent-hist"))
    screenshot(browser, tab, "latent")

    # A bad upload: a message in the page, no trace.
    tab.click("button[data-tab-id=explain]")
    wait_for(tab, "!!document.querySelector('#upload input[type=file]')")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    upload(browser, tab, str(bad))
    status = wait_for(tab, f"{text('#explain-status')}.includes('Cannot read') && {text('#explain-status')}")
    assert "broken.png" in status and "not an image" in status and "Traceback" not in status
    screenshot(browser, tab, "bad-upload")
    tab.click("#upload button[aria-label='Clear']")
    wait_for(tab, "!!document.querySelector('#upload input[type=file]')")

    # Upload an image: its strongest latents, as the library computes them, drawn as heatmaps.
    image = os.path.join(root, "imgs", "cat", "img001.png")
    upload(browser, tab, image)
    wait_for(tab, f"{text('#explain-status')}.includes('strongest')")
    expected = explain([image], first.ckpt_path, top_n=8, device="cpu")
    want = [int(j) for j, v in zip(expected.top_latents[0], expected.top_values[0]) if v > 0]
    wait_for(tab, f"{loaded_images('#explain-images')} === {len(expected.top_latents[0])}")
    shown = tab.js("Array.from(document.querySelectorAll('#jump-pick input')).map(i => +i.value)")
    assert shown == want
    screenshot(browser, tab, "explain")

    # ... then jump to one of them: the Latents tab opens on it.
    tab.click(f"#jump-pick input[value='{want[0]}']")
    wait_for(tab, "document.querySelector('button[data-tab-id=latents]').getAttribute('aria-selected') === 'true'")
    wait_for(tab, f"{text('#latent-summary')}.includes('Latent {want[0]}')")
    wait_for(tab, loaded_images("#latent-images"))

    # Open the other sweep member: its visuals are rendered beside the first's and its latents shown.
    tab.click("button[data-tab-id=sweep]")
    wait_for(tab, f"!!document.querySelector(\"#member-pick input[value='{second.member_id}']\")")
    wait_for(tab, loaded_images("#sweep-plot"))
    screenshot(browser, tab, "sweep")
    tab.click(f"#member-pick input[value='{second.member_id}']")
    tab.click("#open-member")
    wait_for(tab, f"{text('#banner')}.includes('{second.member_id}')", timeout=90)
    wait_for(tab, "document.querySelector('button[data-tab-id=latents]').getAttribute('aria-selected') === 'true'")
    wait_for(tab, loaded_images("#latent-images"))
    other = os.path.join(os.path.dirname(folder), second.member_id)
    assert top_images.read_cache(other).identity.sae_sha256 == top_images.file_sha256(second.ckpt_path)
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
    wait_for(tab, "!!document.querySelector('#upload input[type=file]')")
    upload(browser, tab, os.path.join(root, "imgs", "dog", "img000.png"))
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
    _, folder, *_ = sweep
    book = explorer.LatentBook(folder)
    alive = [int(i) for i in np.flatnonzero(book.cache.freq > 0)]
    assert book.order("id") == alive
    assert book.order("frequency") == sorted(alive, key=lambda i: (-book.cache.freq[i], i))
    assert book.order("mean value") == sorted(alive, key=lambda i: (-book.cache.mean_value[i], i))
    sel = book.assoc.selectivity()
    assert book.order("class selectivity") == sorted(alive, key=lambda i: (-sel[i], i))


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
