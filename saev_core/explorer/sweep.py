"""A sweep as the explorer shows it (``SweepTable``): its members from ``sweep.csv``, their L0-vs-NMSE plot with the
PCA baseline (``controls.json``) and their table beside the controls; and where a member's visuals go."""

import dataclasses
import io
import os

from PIL import Image

from saev_core.analysis import columns
from saev_core.errors import UserError
from saev_core.explorer.reading import read_optional_json
from saev_core.files import inside
from saev_core.train.sweep import check_member_id

TABLE_COLUMNS = (
    "member_id",
    "sae.arch",
    "sae.k",
    "sae.exp_factor",
    "lr",
    "l0",
    "nmse",
    *columns.CONTROL_COLUMNS,
    "frac_dead_train",
)
"""The sweep.csv columns the members table shows, when present (the controls' only after the pipeline added them)."""


@dataclasses.dataclass
class SweepTable:
    """A sweep's members (``sweep.csv`` in a ``train --ckpt-path`` folder)."""

    folder: str

    def __post_init__(self):
        import pandas as pd

        path = os.path.join(self.folder, "sweep.csv")
        if not os.path.isfile(path):
            raise UserError(f"No sweep.csv in {self.folder}; pass --sweep with a `train --ckpt-path` folder.")
        self.path = path
        self.table = pd.read_csv(path, dtype={"member_id": str})  # ids stay text (checked when one is opened)
        self.notes: list[str] = []
        controls, note = read_optional_json(os.path.join(self.folder, "controls.json"), "The sweep's controls")
        self.notes += [note] if note else []
        pca = (controls or {}).get("pca_nmse")
        self.pca_nmse = [float(v) for v in pca] if isinstance(pca, list) and pca else None
        """The PCA baseline's held-out NMSE at 1, 2, ... components (``controls.json`` beside sweep.csv, written by
        the pipeline's controls; None for a sweep without it)."""

    @property
    def members(self) -> list[str]:
        return [str(m) for m in self.table["member_id"]]

    def choices(self) -> list[tuple[str, str]]:
        return [
            (
                f"{r['member_id']} · {r.get('sae.arch', '')} · L0 {r['l0']:.1f} · NMSE {r['nmse']:.3f}",
                str(r["member_id"]),
            )
            for _, r in self.table.iterrows()
        ]

    def plot(self, member: str | None = None) -> Image.Image:
        from saev_core.analysis import plots

        pca = None
        if self.pca_nmse is not None and self.table["l0"].notna().any():
            pca = plots.pca_curve(self.pca_nmse, float(self.table["l0"].max()))
        title = f"sweep {os.path.basename(self.folder.rstrip('/'))}"
        png = plots.l0_vs_nmse_png(self.table, title, pca=pca, chosen=member)
        return Image.open(io.BytesIO(png)).convert("RGB")

    def rows(self) -> tuple[list[list], list[str]]:
        """The members table: each member's settings, its held-out L0 and NMSE, the controls' NMSE at its L0 and its
        gain over each (the fraction by which its NMSE is below the control's), and its dead fraction in training."""
        cols = columns.present(self.table, TABLE_COLUMNS)
        return self.table[cols].round(4).values.tolist(), cols

    def ckpt(self, member: str) -> str:
        check_member_id(member, self.path)
        row = self.table[self.table["member_id"].astype(str) == member]
        if row.empty:
            raise UserError(f"{member!r} is not a member of the sweep in {self.folder}.")
        return str(row.iloc[0]["ckpt"])


def member_visuals_folder(visuals: str, members: list[str], member: str) -> str:
    """Where a member's visuals are (or go): beside the opened folder when that is a member's (the pipeline's
    ``<dump_to>/layer_<L>/<member_id>`` layout), else ``<visuals>/sweep_members/<member_id>``; a member id that
    would leave that folder is refused (``files.inside``)."""
    visuals = os.path.abspath(visuals)
    if os.path.basename(visuals) in members:
        return inside(os.path.dirname(visuals), member, what="member id")
    return inside(os.path.join(visuals, "sweep_members"), member, what="member id")
