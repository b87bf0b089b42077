"""The gallery's scatter plot: log10 frequency vs log10 mean value of every latent that fires, the ones on the page
and the selection's bounds, as PNG (matplotlib, imported when a plot is drawn)."""

import io

import numpy as np
from jaxtyping import Float

_RANGE_COLOUR = "#d62728"
_SHOWN_COLOUR = "#ff7f0e"


def freq_vs_value_png(
    log10_freq: Float[np.ndarray, " n_latents"],
    log10_value: Float[np.ndarray, " n_latents"],
    shown: Float[np.ndarray, "n_shown 2"],
    log_freq_range: tuple[float | None, float | None] | None = None,
    log_value_range: tuple[float | None, float | None] | None = None,
) -> bytes:
    """Scatter of every latent (grey), the ones on the page (orange, ``shown[:, 0]`` freq, ``[:, 1]`` value) and
    the selection bounds (red lines; a shaded box where both ranges are given), as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = np.isfinite(log10_freq) & np.isfinite(log10_value)
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(
        log10_freq[ok],
        log10_value[ok],
        s=4,
        c="0.55",
        alpha=0.6,
        linewidths=0,
        label=f"latents that fire ({int(ok.sum())})",
    )
    on_page = np.isfinite(shown).all(axis=1)
    if on_page.any():
        ax.scatter(
            shown[on_page, 0],
            shown[on_page, 1],
            s=14,
            c=_SHOWN_COLOUR,
            linewidths=0,
            label=f"on this page ({int(on_page.sum())})",
        )
    freq_lo, freq_hi = log_freq_range or (None, None)
    value_lo, value_hi = log_value_range or (None, None)
    drawn = False
    for bound in (freq_lo, freq_hi):
        if bound is not None:
            ax.axvline(bound, color=_RANGE_COLOUR, lw=1.5, label=None if drawn else "selected ranges")
            drawn = True
    for bound in (value_lo, value_hi):
        if bound is not None:
            ax.axhline(bound, color=_RANGE_COLOUR, lw=1.5, label=None if drawn else "selected ranges")
            drawn = True
    if None not in (freq_lo, freq_hi, value_lo, value_hi):
        ax.fill_between([freq_lo, freq_hi], value_lo, value_hi, color=_RANGE_COLOUR, alpha=0.08, linewidth=0)
    ax.set_xlabel("log10 frequency (fraction of patches where the latent fires)")
    ax.set_ylabel("log10 mean value (where it fires)")
    ax.grid(alpha=0.3)
    if ok.any() or on_page.any() or drawn:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
