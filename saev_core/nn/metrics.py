"""Evaluation metrics of an SAE on held-out activations: one definition, used by training, the CLI and Dagster.

``ReconstructionMetrics`` accumulates float64 sums over batches and ``compute()`` returns a dict:

- ``n``: vectors seen; ``d_vit``, ``d_sae``.
- ``mse``: mean over vectors of ``||x - x_hat||^2`` (summed over dims); ``mse_per_dim = mse / d_vit``.
- ``nmse``: ``sum ||x - x_hat||^2 / sum ||x - mean||^2``, the mean being that of the same held-out vectors, so
  predicting that mean gives exactly 1; ``ev = 1 - nmse`` (explained variance). 0/0 gives nan, x/0 gives inf.
- ``l0``: mean count of non-zero latents per vector; ``l1``: mean ``sum |f|`` per vector.
- ``firing_freq`` (numpy [d_sae]): fraction of vectors where a latent is > 0 (every variant here gives f >= 0, so
  a latent counts toward l0 exactly when it fires); ``mean_value`` (numpy [d_sae]): mean of f over the vectors
  where the latent fires, 0 where it never fires.
- ``n_dead`` (never fired on these vectors), ``n_almost_dead`` (freq < 1e-7, dead included), ``n_dense``
  (freq > 1e-2), and ``frac_dead``, ``frac_almost_dead``, ``frac_dense`` (divided by d_sae). On a held-out split a
  rare latent can be missing and count as dead: training reports this as ``frac_dead_heldout`` beside
  ``frac_dead_train``, the latents that did not fire in the last N training vectors (``saev_core.train.trainer``).

All values are computed in raw activation space: ``x`` and ``x_hat`` are what the SAE takes and returns.
"""

import dataclasses
import math

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saev_core import config

ALMOST_DEAD_FREQ = 1e-7
DENSE_FREQ = config.DENSE_FREQ


class ReconstructionMetrics:
    """Float64 accumulator of reconstruction and sparsity metrics over batches of one held-out set."""

    def __init__(self) -> None:
        self.n = 0
        self.sse = 0.0  # sum ||x - x_hat||^2
        # The denominator sum ||x - mean||^2 is merged batch by batch (Chan et al.'s parallel variance): each batch
        # gives its own mean and centred sum of squares, and merging adds n_a n_b / n ||mean_a - mean_b||^2.
        # Unlike sum ||x||^2 - n ||mean||^2, no large terms cancel, so an offset of 1e3 (or 1e6) costs no digits.
        self.mean: np.ndarray | None = None  # [d_vit] running mean of x
        self.m2 = 0.0  # sum ||x - mean||^2 so far
        self.nonzero = 0.0  # sum over vectors of the count of f != 0
        self.abs_sum = 0.0  # sum |f|
        self.fire_count: np.ndarray | None = None  # [d_sae] vectors where f > 0
        self.fire_sum: np.ndarray | None = None  # [d_sae] sum of f where f > 0

    @torch.no_grad()
    def update(
        self,
        x: Float[Tensor, "batch d_vit"],
        x_hat: Float[Tensor, "batch d_vit"],
        f_x: Float[Tensor, "batch d_sae"],
    ) -> None:
        """Add one batch (any device, any float dtype; reduced in float64 on that device)."""
        if x.ndim != 2 or x_hat.shape != x.shape or f_x.ndim != 2 or f_x.shape[0] != x.shape[0]:
            raise ValueError(
                f"Expected x and x_hat [batch, d_vit] and f_x [batch, d_sae]; got x {tuple(x.shape)}, "
                f"x_hat {tuple(x_hat.shape)}, f_x {tuple(f_x.shape)}."
            )
        b = x.shape[0]
        if b == 0:
            return
        if self.mean is not None and (x.shape[1] != self.mean.shape[0] or f_x.shape[1] != self.fire_count.shape[0]):
            raise ValueError(
                f"Batch widths changed: d_vit {x.shape[1]} (was {self.mean.shape[0]}), "
                f"d_sae {f_x.shape[1]} (was {self.fire_count.shape[0]})."
            )
        x64 = x.to(torch.float64)
        f64 = f_x.to(torch.float64)
        fires = f64 > 0

        batch_mean = x64.mean(dim=0)
        batch_m2 = (x64 - batch_mean).square().sum()
        sse = (x64 - x_hat.to(torch.float64)).square().sum()
        nonzero = (f64 != 0).sum(dtype=torch.float64)
        abs_sum = f64.abs().sum()
        fire_count = fires.sum(dim=0, dtype=torch.float64)
        fire_sum = torch.where(fires, f64, 0.0).sum(dim=0)

        batch_mean = batch_mean.cpu().numpy()
        if self.mean is None:
            self.mean, self.m2 = batch_mean, float(batch_m2)
            self.fire_count = np.zeros(f_x.shape[1], dtype=np.float64)
            self.fire_sum = np.zeros(f_x.shape[1], dtype=np.float64)
        else:
            n = self.n + b
            delta = batch_mean - self.mean
            self.m2 += float(batch_m2) + float(delta @ delta) * self.n * b / n
            self.mean = self.mean + delta * (b / n)
        self.n += b
        self.sse += float(sse)
        self.nonzero += float(nonzero)
        self.abs_sum += float(abs_sum)
        self.fire_count += fire_count.cpu().numpy()
        self.fire_sum += fire_sum.cpu().numpy()

    def compute(self) -> dict[str, float | int | np.ndarray]:
        """The metrics so far (see the module docstring for each key)."""
        if self.n == 0 or self.mean is None:
            raise ValueError("No vectors seen: call update() with at least one non-empty batch first.")
        d_vit, d_sae = self.mean.shape[0], self.fire_count.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            nmse = float(np.float64(self.sse) / np.float64(self.m2))
            mean_value = np.where(self.fire_count > 0, self.fire_sum / self.fire_count, 0.0)
        freq = self.fire_count / self.n
        mse = self.sse / self.n
        n_dead = int((self.fire_count == 0).sum())
        n_almost_dead = int((freq < ALMOST_DEAD_FREQ).sum())
        n_dense = int((freq > DENSE_FREQ).sum())
        return {
            "n": self.n,
            "d_vit": d_vit,
            "d_sae": d_sae,
            "mse": mse,
            "mse_per_dim": mse / d_vit,
            "nmse": nmse,
            "ev": 1.0 - nmse,
            "l0": self.nonzero / self.n,
            "l1": self.abs_sum / self.n,
            "firing_freq": freq,
            "mean_value": mean_value,
            "n_dead": n_dead,
            "n_almost_dead": n_almost_dead,
            "n_dense": n_dense,
            "frac_dead": n_dead / d_sae,
            "frac_almost_dead": n_almost_dead / d_sae,
            "frac_dense": n_dense / d_sae,
        }


@dataclasses.dataclass(frozen=True)
class SweepHealth:
    """A trained sweep's health check, with the numbers behind it. ``errors`` block what follows (NaN or infinite
    metrics, every latent dead, the best NMSE above its bound); ``warnings`` do not (more dead latents than the bound,
    the best member losing to PCA at matched L0, or beating the random-decoder control at matched L0 by less than
    ``min_gain_vs_random``: beating PCA alone is no evidence, since an adaptive sparse code beats it even on Gaussian
    noise)."""

    errors: list[str]
    warnings: list[str]
    max_frac_dead: float
    worst_frac_dead: float
    """The largest dead fraction of any member (``frac_dead_train``: the one definition of dead)."""
    worst_dead_member: str
    n_nan_members: int
    best_member: str
    best_nmse: float
    best_pca_nmse: float
    """PCA at the best member's L0 (NaN when not computed)."""
    best_random_nmse: float
    """The random-decoder control at the best member's width and L0 (NaN when not computed)."""

    @property
    def severity(self) -> str:
        return "error" if self.errors else "warn" if self.warnings else "ok"

    @property
    def problems(self) -> list[str]:
        return self.errors + self.warnings

    def numbers(self) -> dict[str, float | int | str]:
        """The check's numbers, for Dagster metadata and logs."""
        return {
            "worst_frac_dead": self.worst_frac_dead,
            "worst_dead_member": self.worst_dead_member,
            "max_frac_dead": self.max_frac_dead,
            "n_nan_members": self.n_nan_members,
            "best_member": self.best_member,
            "best_nmse": self.best_nmse,
            "best_pca_nmse_at_l0": self.best_pca_nmse,
            "best_random_nmse_at_l0": self.best_random_nmse,
        }


def _finite(v) -> bool:
    return v is not None and v == v and abs(v) != math.inf


def sweep_health(
    rows: list[dict],
    max_frac_dead: float,
    max_nmse: float | None = None,
    max_l0: float | None = None,
    min_gain_vs_random: float = config.MIN_GAIN_VS_RANDOM,
) -> SweepHealth:
    """The sweep's health from its rows (sweep.csv rows or metrics.json dicts with ``member_id``, the held-out
    metrics, ``frac_dead_train`` (old rows: ``frac_dead``) and, when computed, ``pca_nmse_at_l0`` and
    ``random_nmse_at_l0``). The best member is ``best_member(rows, max_l0)``, the report's chosen one."""
    errors, warnings = [], []
    worst, worst_id, n_nan = -1.0, "", 0
    for row in rows:
        dead = row.get("frac_dead_train", row.get("frac_dead"))
        values = [row.get(k) for k in ("nmse", "ev", "mse", "l0", "l1")] + [dead]
        if not all(_finite(v) for v in values):
            n_nan += 1
            errors.append(f"{row['member_id']}: NaN or infinite values in its metrics")
            continue
        if dead > worst:
            worst, worst_id = dead, row["member_id"]
        if dead >= 1.0:
            errors.append(f"{row['member_id']}: every latent is dead (none fired {_window(row)})")
        elif dead > max_frac_dead:
            heldout = row.get("frac_dead_heldout")
            also = f"; {heldout:.1%} never fired on the held-out split" if _finite(heldout) else ""
            warnings.append(
                f"{row['member_id']}: {dead:.1%} of its latents are dead (did not fire {_window(row)}; bound "
                f"{max_frac_dead:.0%}){also}"
            )
    best = best_member(rows, max_l0)
    nan = math.nan
    pca = best.get("pca_nmse_at_l0", nan) if best else nan
    rand = best.get("random_nmse_at_l0", nan) if best else nan
    if best is not None:
        if max_nmse is not None and best["nmse"] > max_nmse:
            errors.append(f"best held-out NMSE {best['nmse']:.4f} is above [checks] max_nmse {max_nmse:g}")
        said = f"the best member {best['member_id']} (NMSE {best['nmse']:.4f} at L0 {best['l0']:.1f})"
        if _finite(pca) and best["nmse"] > pca:
            warnings.append(f"{said} loses to PCA at matched L0 (NMSE {pca:.4f})")
        if _finite(rand) and rand > 0 and best["nmse"] > rand:
            warnings.append(f"{said} loses to the random-decoder control at matched L0 (NMSE {rand:.4f})")
        elif _finite(rand) and rand > 0 and (rand - best["nmse"]) / rand < min_gain_vs_random:
            warnings.append(
                f"{said} has only {(rand - best['nmse']) / rand:.0%} less error than the random-decoder control at "
                f"matched L0 (NMSE {rand:.4f}; [checks] min_gain_vs_random {min_gain_vs_random:.0%}): no clear "
                "structure found"
            )
    return SweepHealth(
        errors,
        warnings,
        max_frac_dead,
        max(worst, 0.0) if worst_id else nan,
        worst_id,
        n_nan,
        best["member_id"] if best else "",
        best["nmse"] if best else nan,
        pca,
        rand,
    )


def _window(row: dict) -> str:
    window = row.get("dead_window", row.get("sae.dead_after_n_patches"))
    return f"in the last {int(window):,} training vectors" if _finite(window) else "in training"


def best_member(rows: list[dict], max_l0: float | None = None) -> dict | None:
    """The member with the lowest held-out NMSE among those with L0 <= max_l0 (all when None) and finite metrics;
    None when no member qualifies. Ties go to the first row."""
    ok = [
        r
        for r in rows
        if r.get("nmse") == r.get("nmse") and r.get("l0") == r.get("l0") and (max_l0 is None or r["l0"] <= max_l0)
    ]
    return min(ok, key=lambda r: r["nmse"]) if ok else None
