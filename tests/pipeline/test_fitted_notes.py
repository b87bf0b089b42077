"""The notes on settings fitted to the run ("--lr is not set: using ...") come with training: the sweep stage run
again over a finished sweep trains nothing and says nothing, once per layer or otherwise."""

import logging

import numpy as np

from saev_core import config
from saev_core.pipeline import stages
from saev_core.pipeline.file import Pipeline, ReportPlan
from saev_core.store import write_store


def test_a_rerun_over_a_finished_sweep_gives_no_fitted_setting_notes(tmp_path, caplog):
    acts = np.random.default_rng(0).standard_normal((1, 64, 5, 16)).astype(np.float32)
    store = write_store(str(tmp_path / "acts"), acts)
    train = config.TrainConfig(
        data=config.DataLoadConfig(val_frac=0.25),
        sae=config.SparseAutoencoderConfig(d_vit=16, exp_factor=2, arch="topk", k=4),
        n_patches=20 * 64,
        sae_batch_size=64,
        ckpt_path=str(tmp_path / "ckpts"),
        device="cpu",
        log_every=10**9,
    )  # lr, n_lr_warmup and sae.dead_after_n_patches unset: fitted to this 20-step run, with notes
    pipe = Pipeline(
        path=str(tmp_path / "p.toml"),
        activations=config.ActivationsConfig(),
        train=train,
        sweep={"sae": {"k": [2, 4]}},
        report=ReportPlan(pca=False, random_control=False, kmeans=False),
    )

    def sweep_stage() -> tuple[list[str], list[str]]:
        """(the notes given to on_note, the warnings the trainer logged, which the CLI prints)"""
        notes: list[str] = []
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="saev_core.train.trainer"):
            layer = stages.train_layer(pipe, -2, store.path, show_progress=False, on_note=notes.append)
        assert len(layer.results) == 2
        return notes, [r.getMessage() for r in caplog.records if r.name == "saev_core.train.trainer"]

    notes, logged = sweep_stage()
    assert any(note.startswith("--lr is not set: using ") for note in notes) and logged == notes
    assert sweep_stage() == ([], [])  # the sweep is finished: read back, not trained, no note
