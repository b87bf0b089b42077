"""The visuals job end to end (record -> train -> visuals through the CLI), latent selection, and the cache."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from saev_core import config, nn
from saev_core.__main__ import main
from saev_core.errors import UserError
from saev_core.visuals import render, selection, top_images, topk_cache
from tests.helpers import tiny_run, write_images

N_IMGS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clip_ckpt):
    """A tiny store of 12 non-square images (64 x 48) and a topk SAE trained on it; (images, store, sae.pt)."""
    return tiny_run(tmp_path_factory.mktemp("visuals"), tiny_clip_ckpt, n_imgs=N_IMGS, val_frac=0.2)


def run(capsys, *argv) -> tuple[int, list[str], str]:
    rc = main(["visuals", *argv])
    captured = capsys.readouterr()
    return rc, captured.out.strip().splitlines(), captured.err


WIDE = ["--log-freq-range", "-10", "0", "--log-value-range", "-10", "10"]


def test_cli_renders_every_selected_latent_and_prints_the_gallery_last(trained, tmp_path, capsys):
    _, _, ckpt = trained
    dump_to = tmp_path / "v"
    rc, out, err = run(
        capsys,
        "--ckpt",
        ckpt,
        "--dump-to",
        str(dump_to),
        "--n-imgs-per-latent",
        "3",
        "--top-k",
        "5",
        "--device",
        "cpu",
        *WIDE,
    )
    assert rc == 0, err
    assert out[-1] == str(dump_to / "index.html") and os.path.isfile(out[-1])
    selection = json.loads((dump_to / "cache" / "selection.json").read_text())
    cache = topk_cache.load_cache(str(dump_to), _identity(ckpt, trained[1], 5))
    alive = np.flatnonzero(cache.freq > 0)
    assert sorted(selection["latents"]) == alive.tolist()  # the wide ranges keep every live latent
    for latent in selection["latents"]:
        meta = json.loads((dump_to / "neurons" / str(latent) / "metadata.json").read_text())
        n = min(3, int(cache.n_images()[latent]))
        assert [f"{r}.png" for r in range(n)] == sorted(
            p for p in os.listdir(dump_to / "neurons" / str(latent)) if p.endswith(".png")
        )
        assert meta["image_indices"] == cache.top_images[latent, :n].tolist()
        assert meta["max_value"] == pytest.approx(float(cache.top_values[latent, 0]))
        assert all(label in ("cat", "dog") for label in meta["labels"])
        with Image.open(dump_to / "neurons" / str(latent) / "0.png") as img:
            # 64 x 48 images are rendered at their own size (never enlarged), plus the CLS strip below.
            assert img.width == 64 and img.height > 48


def _identity(ckpt, store_path, k, patches="patches"):
    from saev_core.store import ActivationStore

    return top_images.CacheIdentity(
        topk_cache.file_sha256(ckpt), ActivationStore.open(store_path).metadata.key, -1, patches, k
    )


def test_rerun_reuses_the_cache_without_an_sae_forward(trained, tmp_path, capsys, monkeypatch):
    _, _, ckpt = trained
    args = ["--ckpt", ckpt, "--dump-to", str(tmp_path / "v"), "--top-k", "4", "--device", "cpu", *WIDE]
    assert run(capsys, *args)[0] == 0
    monkeypatch.setattr(nn.SparseAutoencoder, "encode", lambda *a: pytest.fail("the SAE ran again"))
    rc, out, err = run(capsys, *args, "--n-imgs-per-latent", "2")
    assert rc == 0 and "cache reused" in err


def test_a_cache_from_another_sae_is_refused(trained, tmp_path, capsys):
    _, store_path, ckpt = trained
    args = ["--dump-to", str(tmp_path / "v"), "--top-k", "4", "--device", "cpu", *WIDE]
    assert run(capsys, "--ckpt", ckpt, *args)[0] == 0
    other = nn.load(ckpt)
    with torch.no_grad():
        other.W_enc.mul_(1.5)
    other_path = nn.dump(tmp_path / "other" / "sae.pt", other)
    rc, _, err = run(capsys, "--ckpt", other_path, *args)
    assert rc == 2 and "other inputs" in err and "sae_sha256" in err


def test_a_killed_pass_leaves_no_cache(trained, tmp_path, monkeypatch):
    _, _, ckpt = trained
    real_update = top_images._RunningTopK.update
    calls = []

    def die_on_second_batch(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_update(self, *args)

    monkeypatch.setattr(top_images._RunningTopK, "update", die_on_second_batch)
    monkeypatch.setattr(top_images, "batch_images", lambda *a: 4)
    cfg = config.VisualsConfig(ckpt=ckpt, dump_to=str(tmp_path / "v"), device="cpu")
    with pytest.raises(KeyboardInterrupt):
        render.make_visuals(cfg, show_progress=False)
    assert not os.path.exists(topk_cache.cache_path(cfg.dump_to))
    # A kill inside the cache write itself leaves no file either (the rename never happened).
    monkeypatch.setattr(top_images._RunningTopK, "update", real_update)
    monkeypatch.setattr(np, "savez", lambda f, **arrays: (f.write(b"half"), (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        render.make_visuals(cfg, show_progress=False)
    assert not os.path.exists(topk_cache.cache_path(cfg.dump_to))
    assert os.listdir(os.path.dirname(topk_cache.cache_path(cfg.dump_to))) == []


def test_moved_images_work_with_images_root_and_other_images_are_refused(trained, tmp_path, capsys):
    imgs, _, ckpt = trained
    moved = tmp_path / "moved"
    shutil.copytree(imgs, moved)  # copy2: same names, sizes and timestamps
    args = ["--ckpt", ckpt, "--top-k", "3", "--device", "cpu", *WIDE]
    rc, out, err = run(
        capsys, *args, "--dump-to", str(tmp_path / "a"), "images:image-folder-dataset", "--images.root", str(moved)
    )
    assert rc == 0, err
    write_images(tmp_path / "other", N_IMGS, size=(64, 40))
    rc, _, err = run(
        capsys,
        *args,
        "--dump-to",
        str(tmp_path / "b"),
        "images:image-folder-dataset",
        "--images.root",
        str(tmp_path / "other"),
    )
    assert rc == 2 and "not the ones the store" in err


def test_a_checkpoint_without_provenance_needs_the_data_flags(trained, tmp_path, capsys):
    _, store_path, ckpt = trained
    sae = nn.load(ckpt)
    sae.provenance = {}
    bare = nn.dump(tmp_path / "bare" / "sae.pt", sae)
    rc, _, err = run(capsys, "--ckpt", bare, "--dump-to", str(tmp_path / "v"), "--device", "cpu")
    assert rc == 2 and "--data.shard-root" in err and "--data.layer" in err
    rc, out, err = run(
        capsys,
        "--ckpt",
        bare,
        "--dump-to",
        str(tmp_path / "v"),
        "--device",
        "cpu",
        "--top-k",
        "3",
        "--data.shard-root",
        store_path,
        "--data.layer",
        "-1",
        "--data.patches",
        "cls",
        *WIDE,
    )
    assert rc == 0, err


# -- latent selection ------------------------------------------------------------------------------------------


def _synthetic_cache(d_sae=200, seed=0) -> top_images.TopKCache:
    rng = np.random.default_rng(seed)
    freq = 10.0 ** rng.uniform(-7, 0, d_sae)
    freq[rng.choice(d_sae, 20, replace=False)] = 0.0  # dead
    mean = np.where(freq > 0, 10.0 ** rng.uniform(-2, 2, d_sae), 0.0)
    k = 2
    ident = top_images.CacheIdentity("x", "y", -2, "patches", k)
    return top_images.TopKCache(
        ident,
        np.zeros((d_sae, k), np.float32),
        np.zeros((d_sae, k), np.int64),
        np.zeros((d_sae, k, 4), np.float32),
        np.zeros((d_sae, k), np.float32),
        freq,
        mean,
        np.zeros((d_sae, 50), np.int64),
        1000,
    )


def test_filters_select_exactly_what_a_plain_recomputation_selects():
    cache = _synthetic_cache()
    got = selection.select_latents(cache, (-5.0, -1.0), (-1.0, 1.0), n_latents=10_000)
    want = [
        i
        for i in range(cache.d_sae)
        if cache.freq[i] > 0 and -5 <= np.log10(cache.freq[i]) <= -1 and -1 <= np.log10(cache.mean_value[i]) <= 1
    ]
    assert got.tolist() == want and len(want) > 5


def test_n_latents_samples_the_filtered_set_reproducibly_and_includes_come_first():
    cache = _synthetic_cache()
    everything = set(selection.select_latents(cache, (-9.0, 9.0), (-9.0, 9.0), n_latents=10_000).tolist())
    dead = int(np.flatnonzero(cache.freq == 0)[0])
    alive = sorted(everything)
    a = selection.select_latents(cache, (-9.0, 9.0), (-9.0, 9.0), include_latents=(alive[5], dead), n_latents=7, seed=3)
    b = selection.select_latents(cache, (-9.0, 9.0), (-9.0, 9.0), include_latents=(alive[5], dead), n_latents=7, seed=3)
    assert a.tolist() == b.tolist()
    assert a[0] == alive[5] and dead not in a.tolist() and len(a) == 8
    assert set(a[1:].tolist()) <= everything - {alive[5]} and sorted(a[1:].tolist()) == a[1:].tolist()
    with pytest.raises(UserError, match="not latents of this SAE"):
        selection.select_latents(cache, (-9.0, 9.0), (-9.0, 9.0), include_latents=(cache.d_sae,))


# -- the pipeline's [visuals] table ------------------------------------------------------------------------------


def _rows():
    return [
        {"member_id": "a", "nmse": 0.30, "l0": 8.0},
        {"member_id": "b", "nmse": 0.10, "l0": 64.0},
        {"member_id": "c", "nmse": 0.20, "l0": 16.0},
        {"member_id": "d", "nmse": float("nan"), "l0": 4.0},
    ]


def test_best_member_is_the_lowest_nmse_under_the_l0_bound():
    from saev_core.pipeline import file as pipeline_file
    from saev_core.pipeline import stages

    plan = pipeline_file.VisualsPlan(members="best", max_l0=32.0)
    assert [r["member_id"] for r in stages.choose_members(plan, _rows(), "sweep.csv")] == ["c"]
    unbounded = pipeline_file.VisualsPlan(members="best")
    assert [r["member_id"] for r in stages.choose_members(unbounded, _rows(), "sweep.csv")] == ["b"]
    everyone = pipeline_file.VisualsPlan(members="all")
    assert len(stages.choose_members(everyone, _rows(), "sweep.csv")) == 4
    with pytest.raises(UserError, match="L0 <= 2.0"):
        stages.choose_members(pipeline_file.VisualsPlan(max_l0=2.0), _rows(), "sweep.csv")


@pytest.mark.parametrize(
    "table, message",
    [
        ('members = "some"', "visuals.members"),
        ("max_l0 = -1", "visuals.max_l0"),
        ('ckpt = "x.pt"', "set per member"),
        ('probe = "probe.json"', "visuals.probe in .* is set per member"),
        ("top_kk = 3", "Unknown key 'top_kk'"),
        ('log_freq_range = "wide"', "visuals.log_freq_range"),
    ],
)
def test_bad_visuals_table_names_the_key(tmp_path, table, message):
    from saev_core.pipeline import file as pipeline_file

    path = tmp_path / "p.toml"
    path.write_text(f"[activations]\nvit_layers = [-2]\n\n[visuals]\n{table}\n")
    with pytest.raises(UserError, match=message):
        pipeline_file.load_pipeline(str(path))


@pytest.mark.parametrize(
    "text, message",
    [
        ('[demo]\nrandom_vit = "false"\n', "demo.random_vit"),
        ("[demo]\nrandom_vits = true\n", r"random_vits.*\[demo\]"),
        ('[train]\nsweep = "s.toml"\n', "train.sweep"),
        ("[automation]\nobserve_cron = 5\n", "automation.observe_cron"),
        ("[watch]\nfolders = 'x'\n", r"folders.*\[watch\]"),
        ("[checks]\nmax_nmse = -1\n", "checks.max_nmse"),
        ("[report]\npca = 'yes'\n", "report.pca"),
    ],
)
def test_every_table_of_a_pipeline_file_is_checked(tmp_path, text, message):
    from saev_core.pipeline import file as pipeline_file

    path = tmp_path / "p.toml"
    path.write_text("[activations]\nvit_layers = [-2]\n\n" + text)
    with pytest.raises(UserError, match=message):
        pipeline_file.load_pipeline(str(path))


def test_a_damaged_cache_is_a_clear_error(trained, tmp_path, capsys):
    _, _, ckpt = trained
    args = ["--ckpt", ckpt, "--dump-to", str(tmp_path / "v"), "--top-k", "3", "--device", "cpu", *WIDE]
    assert run(capsys, *args)[0] == 0
    with open(tmp_path / "v" / "cache" / "topk.npz", "r+b") as f:
        f.truncate(100)
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "cannot be read" in err and "Traceback" not in err


def test_fewer_images_or_latents_on_a_rerun_leave_no_stale_heatmaps(trained, tmp_path, capsys):
    _, _, ckpt = trained
    args = ["--ckpt", ckpt, "--dump-to", str(tmp_path / "v"), "--top-k", "5", "--device", "cpu", *WIDE]
    assert run(capsys, *args, "--n-imgs-per-latent", "4")[0] == 0
    n_before = len(os.listdir(tmp_path / "v" / "neurons"))
    assert run(capsys, *args, "--n-imgs-per-latent", "2", "--n-latents", "3")[0] == 0
    selection = json.loads((tmp_path / "v" / "cache" / "selection.json").read_text())
    folders = sorted(int(p) for p in os.listdir(tmp_path / "v" / "neurons"))
    # Three drawn, plus the latents the class table names (the store has classes), which are always shown.
    drawn = [j for j in selection["latents"] if j not in selection["linked_latents"]]
    assert folders == sorted(selection["latents"]) and len(drawn) == 3 and len(folders) < n_before
    shown = set()
    for latent, n in zip(selection["latents"], selection["n_heatmaps"]):
        pngs = sorted(p for p in os.listdir(tmp_path / "v" / "neurons" / str(latent)) if p.endswith(".png"))
        assert pngs == [f"{r}.png" for r in range(n)] and n <= 2
        meta = json.loads((tmp_path / "v" / "neurons" / str(latent) / "metadata.json").read_text())
        shown |= {f"{i}.png" for i in meta["image_indices"]}
    assert sorted(os.listdir(tmp_path / "v" / "originals")) == sorted(shown)  # no stale originals either
    assert render.missing_images(str(tmp_path / "v")) == []


def test_a_saev_0_1_0_checkpoint_gets_the_stores_normalisation(trained, tmp_path):
    from saev_core.store import ActivationStore, stats

    _, store_path, ckpt = trained
    sae = nn.load(ckpt)
    legacy = nn.load(ckpt)
    legacy.provenance = {}
    with torch.no_grad():
        legacy.mean.zero_()
        legacy.scale.fill_(1.0)
    bare = nn.dump(tmp_path / "bare" / "sae.pt", legacy)
    cfg = config.VisualsConfig(
        ckpt=bare,
        dump_to=str(tmp_path / "v"),
        device="cpu",
        data=config.VisualsDataConfig(shard_root=store_path, layer=-1, patches="patches"),
    )
    inputs = render.resolve_inputs(cfg, "cpu")
    mean, scale = stats.normalization(
        ActivationStore.open(store_path), config.DataLoadConfig(layer=-1, patches="patches")
    )
    np.testing.assert_allclose(inputs.sae.mean.numpy(), mean, rtol=1e-6)
    assert float(inputs.sae.scale) == pytest.approx(scale, rel=1e-6)
    np.testing.assert_allclose(inputs.sae.mean.numpy(), sae.mean.numpy(), rtol=1e-5, atol=1e-6)  # what training used
