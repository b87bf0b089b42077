"""The pipeline file: inputs checked when it loads, relative paths relative to the file."""

import os

import pytest

from saev_core.errors import UserError
from saev_core.pipeline import file as pipeline_file


def write(tmp_path, text: str) -> str:
    path = tmp_path / "exp" / "p.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def test_relative_paths_are_relative_to_the_files_folder(tmp_path, monkeypatch):
    (tmp_path / "exp" / "imgs").mkdir(parents=True)
    (tmp_path / "exp" / "drop").mkdir()
    (tmp_path / "exp" / "w.pt").write_bytes(b"x")
    path = write(
        tmp_path,
        """
[activations]
vit_ckpt = "saev-tiny-clip/./w.pt"
vit_layers = [-1]
dump_to = "acts"
[activations.data]
kind = "image-folder-dataset"
root = "imgs"
[train]
ckpt_path = "../ckpts"
[visuals]
dump_to = "s3://bucket/vis"
[watch]
folder = "drop"
""",
    )
    monkeypatch.chdir(tmp_path)  # elsewhere than the file's folder
    pipe = pipeline_file.load_pipeline(path)
    exp = tmp_path / "exp"
    assert pipe.activations.dump_to == str(exp / "acts")
    assert pipe.activations.data.root == str(exp / "imgs")
    assert pipe.activations.vit_ckpt == f"saev-tiny-clip/{exp / 'w.pt'}"
    assert pipe.train.ckpt_path == str(tmp_path / "ckpts")
    assert pipe.visuals.visuals.dump_to == "s3://bucket/vis"
    assert pipe.watch.folder == str(exp / "drop")


def test_the_embedded_demo_writes_under_the_folder_the_user_runs_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = pipeline_file.load_pipeline(pipeline_file.embedded_demo_path())
    assert pipe.activations.dump_to == os.path.join(str(tmp_path), "runs", "demo", "activations")


@pytest.mark.parametrize(
    "acts, message",
    [
        ('vit_ckpt = "saev-tiny-clip/missing.pt"', r"activations.vit_ckpt.*no file at .*missing.pt"),
        ('vit_ckpt = "ViT-B-32/openai"\nvit_layers = [12]', r"activations.vit_layers.*\[12\] out of range.*12 blocks"),
        ('vit_ckpt = "ViT-B-32/openai"\nvit_layers = [-13]', r"out of range"),
        ('vit_family = "clap"', r"unknown ViT family 'clap'"),
        ("n_workers_fanout = 0", r"activations.n_workers_fanout = 0 in .*whole number >= 1"),
        ('n_workers_fanout = "2"', r"activations.n_workers_fanout = '2' in "),
    ],
)
def test_bad_inputs_fail_when_the_file_loads(tmp_path, acts, message):
    path = write(tmp_path, f"[activations]\n{acts}\n")
    with pytest.raises(UserError, match=message):
        pipeline_file.load_pipeline(path)


def test_a_missing_image_folder_fails_when_the_file_loads(tmp_path):
    path = write(
        tmp_path,
        '[activations]\nvit_ckpt = "ViT-B-32/openai"\n[activations.data]\n'
        'kind = "image-folder-dataset"\nroot = "nowhere"\n',
    )
    with pytest.raises(UserError, match=r"activations.data.root.*nowhere.*not a folder"):
        pipeline_file.load_pipeline(path)


def test_random_vit_may_name_a_file_that_does_not_exist_yet(tmp_path):
    path = write(tmp_path, '[demo]\nrandom_vit = true\n[activations]\nvit_ckpt = "ViT-B-32/w/new.pt"\n')
    assert pipeline_file.load_pipeline(path).checkpoint_file() == str(tmp_path / "exp" / "w" / "new.pt")


def test_segmentation_sources_in_the_pipeline_file(tmp_path):
    (tmp_path / "exp" / "ade").mkdir(parents=True)
    seg = write(
        tmp_path,
        '[activations]\nvit_ckpt = "ViT-B-32/openai"\n[activations.data]\nkind = "seg-folder-dataset"\n'
        'root = "ade"\nskip_bad = true\n',
    )
    data = pipeline_file.load_pipeline(seg).activations.data
    assert (data.root, data.skip_bad) == (str(tmp_path / "exp" / "ade"), True)
    embedded = write(
        tmp_path,
        '[activations]\nvit_ckpt = "ViT-B-32/openai"\n[activations.data]\nkind = "embedded-seg-dataset"\n'
        'cache_dir = "cache"\nn_imgs = 64\n',
    )
    data = pipeline_file.load_pipeline(embedded).activations.data
    assert (data.cache_dir, data.n_imgs) == (str(tmp_path / "exp" / "cache"), 64)
    missing = write(
        tmp_path, '[activations]\nvit_ckpt = "ViT-B-32/openai"\n[activations.data]\nkind = "seg-folder-dataset"\n'
    )
    with pytest.raises(UserError, match=r"activations.data.root.*ade20k.*not a folder"):
        pipeline_file.load_pipeline(missing)


def test_the_cli_pipeline_writes_a_report_that_reads_itself(tmp_path, tiny_clip_ckpt):
    """Record, train, visuals and the report through ``python -m saev_core pipeline`` with [report] seeds = 2: the
    report opens with its provenance, gives a verdict per layer, a seed-consistency line, the controls in sweep.csv,
    paths relative to its folder, and a glossary."""
    import pandas as pd

    from saev_core.__main__ import main
    from tests.helpers import tiny_pipeline_text, write_images

    write_images(tmp_path / "imgs", 16)
    text = tiny_pipeline_text(tmp_path, tiny_clip_ckpt, [-1]) + "\n[report]\nseeds = 2\nkmeans = true\n"
    path = tmp_path / "p.toml"
    path.write_text(text)
    assert main(["pipeline", "--path", str(path)]) == 0
    report = (tmp_path / "ckpts" / "report.md").read_text()
    table = pd.read_csv(tmp_path / "ckpts" / "layer_-1" / "sweep.csv")
    assert {"pca_nmse_at_l0", "random_nmse_at_l0", "kmeans_nmse", "gain_vs_pca", "gain_vs_random"} <= set(table)
    assert (tmp_path / "ckpts" / "layer_-1" / "controls.json").is_file()
    header = report.split("## Layer")[0]
    assert "- ViT: clip saev-tiny-clip from `../" in header and "- Code: saev-dagster" in header
    assert "- Images: image-folder-dataset `../imgs` (16 images)" in header  # paths relative to the report
    assert "- Pipeline file: `../p.toml`" in header and "2 members, 32 steps (2,048 vectors) each" in header
    layer = report.split("## Layer -1")[1]
    assert "**Chosen: " in layer and ("**Structure found**" in layer or "**No structure found**" in layer)
    assert "Seed consistency: retrained with seed" in layer
    assert (tmp_path / "ckpts" / "layer_-1" / "seeds" / "sweep.csv").is_file()  # the retrained member
    assert str(tmp_path) not in layer.split("| member_id")[1]  # the table's paths are relative to the report
    assert "layer_-1/" in layer and "## Columns" in report and "`gain_vs_pca / gain_vs_random" in report


def test_a_member_id_or_file_name_that_leaves_its_folder_is_refused_and_nothing_is_written(tmp_path):
    """The visuals stage builds <dump_to>/layer_<L>/<member_id> from sweep.csv, the dropped-file visuals
    <dump_to>/dropped/<file name>: ``../`` in either is refused with one message naming it."""
    from saev_core.pipeline import stages, watch

    path = write(tmp_path, '[activations]\nvit_ckpt = "ViT-B-32/openai"\n[visuals]\ndump_to = "vis"\n')
    pipe = pipeline_file.load_pipeline(path)
    csv = tmp_path / "sweep.csv"
    csv.write_text("member_id,l0,nmse,ckpt\n0123456789ab,4.0,0.5,/x/sae.pt\n../../escape,4.0,0.1,/x/sae.pt\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=rf"member_id '\.\./\.\./escape' in {csv}.*12 lowercase hex"):
        stages.visuals_for_layer(pipe, -2, str(csv), show_progress=False)
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(UserError, match=r"member id '\.\./x'.*leave"):
        pipe.visuals.folder(-2, "../x")
    assert pipe.visuals.folder(-2, "0123456789ab") == str(tmp_path / "exp" / "vis" / "layer_-2" / "0123456789ab")
    with pytest.raises(UserError, match=r"file name '\.\./x\.pt'"):
        watch.dropped_visuals_config(
            pipe.visuals.visuals, str(tmp_path), "../x.pt", stages.dropped_visuals_folder(pipe)
        )
    assert sorted(tmp_path.rglob("*")) == before


def test_ids_that_pandas_would_read_as_numbers_stay_member_ids(tmp_path):
    """``012345678901`` (leading zero) and ``12e456789012`` (a float's exponent) are valid hex ids; read as text."""
    from saev_core.train import results

    csv = tmp_path / "sweep.csv"
    csv.write_text("member_id,l0\n012345678901,1\n12e456789012,2\n")
    assert list(results.read_sweep_csv(str(csv))["member_id"]) == ["012345678901", "12e456789012"]


def test_the_probe_table_is_optional_and_checked(tmp_path):
    acts = '[activations]\nvit_ckpt = "ViT-B-32/openai"\n'
    assert pipeline_file.load_pipeline(write(tmp_path, acts)).probe is None
    pipe = pipeline_file.load_pipeline(write(tmp_path, acts + '[probe]\nmembers = "all"\nk = 7\ncontrols = ["pca"]\n'))
    assert pipe.probe.members == "all" and pipe.probe.probe.k == 7 and pipe.probe.probe.controls == ("pca",)
    assert pipe.probe.folder("/c/layer_0/m1/sae.pt") == "/c/layer_0/m1/probes"
    for table, message in [
        ('members = "some"', r"probe.members = 'some' .*'best', 'all'"),
        ("tau = 2.0", r"--tau 2.0 must be in \[0, 1\]"),
        ('dump_to = "x"', r"probe.dump_to .* set per member"),
        ("kk = 3", r"Unknown key"),
    ]:
        with pytest.raises(UserError, match=message):
            pipeline_file.load_pipeline(write(tmp_path, acts + f"[probe]\n{table}\n"))


def test_the_pipeline_command_runs_the_probe_stage_and_notes_a_store_without_labels(tmp_path, tiny_clip_ckpt, capsys):
    from saev_core.__main__ import main
    from tests.helpers import tiny_pipeline_text, write_images

    write_images(tmp_path / "imgs", 6)
    path = tmp_path / "p.toml"
    path.write_text(tiny_pipeline_text(tmp_path, tiny_clip_ckpt, [-1]) + '\n[probe]\nmembers = "best"\n')
    assert main(["pipeline", "--path", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: layer -1: no patch probes: the store" in err and "data:seg-folder-dataset" in err


def test_a_missing_watched_folder_is_refused_unless_the_file_asks_to_create_it(tmp_path):
    base = '[activations]\nvit_ckpt = "ViT-B-32/openai"\n[watch]\nfolder = "drop"\n'
    with pytest.raises(UserError, match=r"watch.folder = .*drop.* is not a folder.*create = true"):
        pipeline_file.load_pipeline(write(tmp_path, base))
    assert not (tmp_path / "exp" / "drop").exists()
    pipe = pipeline_file.load_pipeline(write(tmp_path, base + "create = true\n"))
    assert pipe.watch.folder == str(tmp_path / "exp" / "drop") and os.path.isdir(pipe.watch.folder)
