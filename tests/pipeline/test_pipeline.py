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
