"""The report reads each member's probe.json: mAP and Coverage beside the controls' mAP, and a verdict line."""

import json
import math

import pandas as pd

from saev_core.analysis import controls, report


def _member(tmp_path, member_id: str, probe: dict | None) -> dict:
    folder = tmp_path / member_id
    (folder / "probes").mkdir(parents=True)
    if probe is not None:
        (folder / "probes" / "probe.json").write_text(json.dumps(probe))
    return {
        "member_id": member_id,
        "sae.arch": "topk",
        "sae.d_vit": 8,
        "sae.exp_factor": 2,
        "sae.k": 2,
        "lr": 1e-3,
        "nmse": 0.2 if member_id == "a" * 12 else 0.3,
        "l0": 2.0,
        "n_patches": 4096,
        "sae_batch_size": 64,
        "frac_dead_train": 0.0,
        "ckpt": str(folder / "sae.pt"),
    }


def test_probe_columns_come_from_each_members_probe_json_and_the_verdict_names_them(tmp_path):
    probe = {
        "map": 0.31,
        "coverage": 0.5,
        "controls": {"pca": {"map": 0.09}, "random": {"map": 0.05}, "kmeans": {"map": None}},
    }
    rows = [_member(tmp_path, "a" * 12, probe), _member(tmp_path, "b" * 12, None)]
    sweep = controls.SweepControls(pd.DataFrame(rows), None, [])
    rep = report.layer_report(-2, sweep, None, report.RunFacts(n_train_vectors=1000))
    first, second = rep.table.to_dict("records")
    assert (first["map"], first["coverage"], first["pca_map"], first["random_map"]) == (0.31, 0.5, 0.09, 0.05)
    assert math.isnan(first["kmeans_map"]) and math.isnan(second["map"])  # null, and no probe.json
    [line] = [x for x in rep.verdict if x.startswith("Patch probes")]
    assert "mAP 0.310 (controls: PCA 0.090, random atoms 0.050)" in line and "coverage 50%" in line
    assert " map " in report.markdown_table(rep.table).splitlines()[0]


def test_no_probe_json_no_columns(tmp_path):
    sweep = controls.SweepControls(pd.DataFrame([_member(tmp_path, "c" * 12, None)]), None, [])
    rep = report.layer_report(-2, sweep, None, report.RunFacts(n_train_vectors=1000))
    assert "map" not in rep.table and not any(x.startswith("Patch probes") for x in rep.verdict)
