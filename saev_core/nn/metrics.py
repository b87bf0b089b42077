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

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

ALMOST_DEAD_FREQ = 1e-7
DENSE_FREQ = 1e-2


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


def sweep_problems(rows: list[dict], max_frac_dead: float) -> list[str]:
    """What is wrong with a trained sweep, one line per problem (empty when healthy): NaN metrics, or more dead
    latents than ``max_frac_dead``. rows: one dict per member (a sweep.csv row or metrics.json) with ``member_id``,
    the held-out metrics and ``frac_dead_train``, the latents that did not fire in the last
    ``sae.dead_after_n_patches`` training vectors (rows from before that column: ``frac_dead``)."""
    problems = []
    for row in rows:
        dead = row.get("frac_dead_train", row.get("frac_dead"))
        values = [row.get(k) for k in ("nmse", "ev", "mse", "l0", "l1")] + [dead]
        if any(v is None or v != v for v in values):
            problems.append(f"{row['member_id']}: NaN in its metrics")
        elif dead > max_frac_dead:
            window = row.get("dead_window", row.get("sae.dead_after_n_patches"))
            known = window is not None and window == window  # a sweep.csv cell may be NaN
            where = f"in the last {int(window):,} training vectors" if known else "in training"
            heldout = row.get("frac_dead_heldout")
            known = heldout is not None and heldout == heldout
            also = f"; {heldout:.1%} never fired on the held-out split" if known else ""
            problems.append(
                f"{row['member_id']}: {dead:.1%} of its latents did not fire {where} (bound {max_frac_dead:.0%}){also}"
            )
    return problems


def best_member(rows: list[dict], max_l0: float | None = None) -> dict | None:
    """The member with the lowest held-out NMSE among those with L0 <= max_l0 (all when None) and finite metrics;
    None when no member qualifies. Ties go to the first row."""
    ok = [
        r
        for r in rows
        if r.get("nmse") == r.get("nmse") and r.get("l0") == r.get("l0") and (max_l0 is None or r["l0"] <= max_l0)
    ]
    return min(ok, key=lambda r: r["nmse"]) if ok else None
