"""`python -m saev_core pipeline`: one line per stage with its time and key figure, progress bars on stderr, no INFO
log; the figures are those of the files the stages wrote."""

import re

import pandas as pd

from saev_core.__main__ import main
from tests.helpers import tiny_pipeline_text, write_images

LAYERS = [0, -1]
STAGE = re.compile(r"^(\S.*?) +([\d.]+) s  (.*)$")


def test_the_pipeline_command_prints_one_line_per_stage_with_its_figures(tmp_path, tiny_clip_ckpt, capsys):
    write_images(tmp_path / "imgs", 6)
    path = tmp_path / "pipeline.toml"
    path.write_text(tiny_pipeline_text(tmp_path, tiny_clip_ckpt, LAYERS))
    assert main(["pipeline", "--path", str(path)]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    stages = {m[1]: m[3] for line in out if (m := STAGE.match(line))}
    assert list(stages) == [
        "activations[0, -1]",
        "sae_sweep[0]",
        "topk_visuals[0]",
        "sae_sweep[-1]",
        "topk_visuals[-1]",
        "sweep_report",
    ]
    report = tmp_path / "ckpts" / "report.md"
    found = open(report).read().count("**Structure found**")
    assert stages["sweep_report"] == f"structure found in {found} of {len(LAYERS)} layers"
    assert f"  report: {report}" in out
    assert re.match(r"[\d.]+ MB at [\d.]+ img/s: ", stages["activations[0, -1]"])
    for layer in LAYERS:
        sweep = pd.read_csv(tmp_path / "ckpts" / f"layer_{layer}" / "sweep.csv", dtype={"member_id": str})
        best = sweep.loc[sweep["nmse"].idxmin()]
        assert stages[f"sae_sweep[{layer}]"] == (
            f"2 members; lowest NMSE {best['nmse']:.4f} at L0 {best['l0']:.1f} ({best['member_id']})"
        )
    assert len([line for line in out if line.strip().startswith("gallery (")]) == 2 * len(LAYERS)  # members = "all"
    assert len(out) < 40
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert not [line for line in err if line.startswith("INFO")], err  # no INFO log (open_clip's included)
    assert any("%|" in line for line in err)  # the progress bars
