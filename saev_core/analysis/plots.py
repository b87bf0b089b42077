"""Pictures of results: people would rather look at these than at tables."""

import io

import pandas as pd


def pca_curve(pca_nmse, max_l0: float) -> tuple[list[int], list[float]]:
    """The PCA baseline drawn beside a sweep: (components, held-out NMSE) from 1 to 1.5 x the sweep's largest L0
    (at least 1), capped at the components there are. ``pca_nmse[k - 1]``: the NMSE at k components."""
    top = int(min(max(float(max_l0), 1.0) * 1.5, len(pca_nmse)))
    return list(range(1, top + 1)), [float(v) for v in pca_nmse[:top]]


def l0_vs_nmse_png(
    sweep: pd.DataFrame, title: str = "", pca: tuple[list[int], list[float]] | None = None, chosen: str | None = None
) -> bytes:
    """The sparsity / reconstruction trade-off of a sweep (one point per member, coloured by architecture), as PNG.

    sweep: rows as in sweep.csv (columns ``l0``, ``nmse``, ``sae.arch``, ``member_id``). pca: (components, held-out
    NMSE) of the PCA baseline, drawn as a line (an SAE below it beats PCA at matched L0). chosen: a member_id to
    ring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    for arch, rows in sweep.groupby("sae.arch"):
        ax.scatter(rows["l0"], rows["nmse"], label=arch, s=30)
        for _, row in rows.iterrows():
            ax.annotate(
                str(row["member_id"])[:6],
                (row["l0"], row["nmse"]),
                fontsize=6,
                alpha=0.7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    if pca is not None:
        ax.plot(pca[0], pca[1], color="grey", linestyle="--", marker=".", label="PCA, L0 components")
    if chosen is not None and (sweep["member_id"] == chosen).any():
        row = sweep[sweep["member_id"] == chosen].iloc[0]
        ax.scatter([row["l0"]], [row["nmse"]], s=140, facecolors="none", edgecolors="black", label="chosen")
    ax.set_xlabel("L0 (active latents per vector)")
    ax.set_ylabel("NMSE (held out)")
    ax.set_title(title or "SAE sweep: sparsity vs reconstruction", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
