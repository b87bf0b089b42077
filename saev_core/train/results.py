"""What a sweep leaves on disk once trained: each member's ``sae.pt``, ``latent_stats.npz`` and ``metrics.json``
(written last: with ``sae.pt`` it marks the member finished), the provenance recorded in the checkpoint, and the
sweep's table ``sweep.csv`` (one row per member). The loop (``trainer``) writes them; the report, the pipeline and
the CLI read them."""

import dataclasses
import math
import os

import numpy as np

from saev_core import config, nn
from saev_core.errors import UserError
from saev_core.files import absolute, atomic_write, atomic_write_json, read_json
from saev_core.record.checkpoints import absolute_ckpt
from saev_core.store import ActivationStore
from saev_core.train import resume
from saev_core.train.sweep import check_member_id, member_id

SUMMARY_METRICS = (
    "nmse",
    "ev",
    "mse",
    "l0",
    "l0_train",
    "l1",
    "frac_dead_train",
    "frac_dead_heldout",
    "frac_dense",
    "frac_dead",
)
"""The metrics that go in sweep.csv (``frac_dead`` is the old name of ``frac_dead_train``)."""


@dataclasses.dataclass(frozen=True)
class MemberResult:
    member_id: str
    """12 hex digits naming the member's settings (``sweep.member_id``)."""
    cfg: config.TrainConfig
    """The member's full config, as trained (unset run-length settings filled in by ``fit_to_run``)."""
    ckpt_path: str
    """Its checkpoint file ``<ckpt_path>/<member_id>/sae.pt`` (load with ``nn.load``)."""
    metrics: dict
    """metrics.json: held-out metrics (nmse, ev, mse, l0, l1, frac_dead_heldout, frac_dense, ...) and the
    training-stream dead count (frac_dead_train)."""


def provenance(store: ActivationStore, cfg: config.TrainConfig, n_steps: int) -> dict:
    meta = store.metadata
    # Absolute paths: the checkpoint is read later from other folders (visuals, inference, the explorer).
    return {
        "store": absolute(store.path),
        "store_key": meta.get("key"),
        "layer": cfg.data.layer,
        "recorded_layer": store.recorded_layer(cfg.data.layer),
        "token_mode": cfg.data.patches,
        "vit_family": meta.get("vit_family"),
        "vit_ckpt": absolute_ckpt(meta.vit_family, meta.vit_ckpt),
        "d_vit": store.d_vit,
        "scale_mean": cfg.data.scale_mean,
        "scale_norm": cfg.data.scale_norm,
        "steps": n_steps,
        "n_patches_seen": n_steps * cfg.sae_batch_size,
        "data_seed": cfg.seed,
    }


# ----------------------------------------------------------------------------------------------------------------
# A member's files and the sweep's table
# ----------------------------------------------------------------------------------------------------------------


def write_member(folder: str, sae: nn.SparseAutoencoder, metrics: dict, provenance: dict) -> None:
    """sae.pt, latent_stats.npz, then metrics.json (last: marks the member finished), then drop the train state."""
    nn.dump(folder, sae, provenance)
    atomic_write(
        os.path.join(folder, "latent_stats.npz"),
        lambda f: np.savez(f, firing_freq=metrics["firing_freq"], mean_value=metrics["mean_value"]),
    )
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, np.ndarray)}
    atomic_write_json(os.path.join(folder, "metrics.json"), scalars)
    resume.remove_train_states(folder)


def is_finished(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, nn.CKPT_NAME)) and os.path.isfile(os.path.join(folder, "metrics.json"))


def read_result(cfg: config.TrainConfig, folder: str) -> MemberResult:
    metrics = read_json(os.path.join(folder, "metrics.json"))
    return MemberResult(member_id(cfg), cfg, os.path.join(folder, nn.CKPT_NAME), metrics)


def sweep_csv_path(ckpt_path: str) -> str:
    """Where a sweep's table goes: one row per member (config, held-out metrics, checkpoint path)."""
    return os.path.join(ckpt_path, "sweep.csv")


def read_sweep_csv(path: str):
    """sweep.csv as a DataFrame, member ids kept as text (``012345678901`` or ``12e456789012`` would otherwise be
    read as numbers) and each checked against the member id pattern, so a path built from one stays a member's."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"member_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"Cannot read the sweep table {path}: {err}. Train the sweep again to rewrite it.") from None
    if "member_id" not in table:
        raise UserError(f"{path} has no member_id column; pass the sweep.csv that `train` wrote.")
    for value in table["member_id"]:
        check_member_id(value, path)
    return table


def write_sweep_csv(results: list[MemberResult], path: str) -> None:
    """One row per member: member_id, the flattened config (``sae.arch``, ``lr``, ...), metrics, ckpt."""
    import pandas as pd

    rows = [
        {
            "member_id": r.member_id,
            **_flatten(dataclasses.asdict(r.cfg)),
            **{k: r.metrics.get(k, math.nan) for k in SUMMARY_METRICS},
            "ckpt": r.ckpt_path,
        }
        for r in results
    ]
    atomic_write(path, lambda f: f.write(pd.DataFrame(rows).to_csv(index=False).encode()))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
