"""The explorer's data side: one visuals folder (``LatentBook``) and one sweep (``SweepTable``), read only from the
files the visuals and train jobs wrote. Imports no Gradio, so it is tested on its own."""

import dataclasses
import functools
import io
import math
import os

import numpy as np
from PIL import Image

from saev_core import nn
from saev_core.errors import UserError
from saev_core.files import inside, read_json
from saev_core.train.sweep import check_member_id
from saev_core.visuals import association, heatmaps, render, top_images

SORT_KEYS = ("frequency", "mean value", "max value", "id", "class selectivity")
N_IMAGES_SHOWN = 12
N_TABLE_ROWS = 500


def _provenance(ckpt: str | None) -> dict:
    """A checkpoint's provenance from its header alone (no weights read); {} when there is none or it is unreadable
    (the caller then says what is missing)."""
    if ckpt is None:
        return {}
    try:
        return nn.read_provenance(ckpt)
    except UserError:
        return {}


class LatentBook:
    """One visuals folder: its top-k cache, class association and selection, and how to draw its heatmaps."""

    def __init__(self, dump_to: str, ckpt: str | None = None):
        self.dump_to = os.path.abspath(dump_to)
        cache = top_images.read_cache(self.dump_to)
        if cache is None:
            raise UserError(
                f"No top-k cache in {self.dump_to} (cache/topk.npz): pass a folder written by `python -m "
                "saev_core visuals --dump-to DIR`, or run that first."
            )
        self.cache = cache
        self.selection = read_json(os.path.join(self.dump_to, "cache", "selection.json")) or {}
        self.assoc = association.load(self.dump_to, cache.identity)
        self.ckpt = ckpt or self.selection.get("ckpt")
        self.ckpt_problem = self._check_ckpt()
        self._store = None
        self._shown = dict(zip(self.selection.get("latents", []), self.selection.get("n_images", [])))

    def _check_ckpt(self) -> str | None:
        """Why uploads cannot be explained with ``self.ckpt`` (None when they can)."""
        if self.ckpt is None:
            return (
                "No SAE checkpoint is known for this folder (its selection.json predates that field); pass "
                "--ckpt to explain uploaded images."
            )
        path = nn.ckpt_file(self.ckpt)
        if not os.path.isfile(path):
            return f"The checkpoint {path} does not exist; pass --ckpt with the SAE of {self.dump_to}."
        if top_images.file_sha256(path) != self.cache.identity.sae_sha256:
            return (
                f"The visuals cache in {self.dump_to} was made from another SAE than {path} (their SHA-256 "
                "differ), so its latents are not that checkpoint's. Pass --ckpt with the SAE the visuals were "
                "made from, or render visuals of this one (`python -m saev_core visuals --ckpt ...`)."
            )
        self.ckpt = path
        return None

    @property
    def store(self):
        """The activation store (opened when a heatmap has to be drawn from the cache: its image list and ViT)."""
        if self._store is None:
            from saev_core.store import ActivationStore

            path = self.selection.get("store") or _provenance(self.ckpt).get("store")
            if path is None:
                raise UserError(
                    f"{self.dump_to}/cache/selection.json does not name the store (older visuals); render "
                    "the visuals again to browse latents beyond the rendered ones."
                )
            self._store = ActivationStore.open(path)
        return self._store

    @property
    def alive(self) -> np.ndarray:
        return np.flatnonzero(self.cache.freq > 0)

    def order(self, key: str) -> list[int]:
        """The latents that fire on the store, sorted by ``key`` (largest first, ids ascending), ties broken by id."""
        ids = self.alive
        if key == "id":
            return ids.tolist()
        values = {
            "frequency": self.cache.freq,
            "mean value": self.cache.mean_value,
            "max value": self.cache.top_values[:, 0],
            "class selectivity": self.assoc.selectivity() if self.assoc is not None else None,
        }.get(key)
        if values is None:
            raise UserError(
                f"Cannot sort by {key!r}"
                + (
                    ": the store has no classes (one image folder per class gives them)."
                    if key == "class selectivity"
                    else "."
                )
            )
        vals = np.nan_to_num(values[ids], nan=-np.inf)
        return ids[np.lexsort((ids, -vals))].tolist()

    def table(self, key: str) -> list[list]:
        """Rows for the latent table: id, log10 frequency, log10 mean value, max value, best class."""
        rows = []
        for latent in self.order(key)[:N_TABLE_ROWS]:
            best = self.assoc.top_classes(latent, 1) if self.assoc is not None else []
            rows.append(
                [
                    latent,
                    round(math.log10(self.cache.freq[latent]), 3),
                    round(math.log10(self.cache.mean_value[latent]), 3),
                    round(float(self.cache.top_values[latent, 0]), 4),
                    f"{best[0][0]} ({best[0][1]:.2f})" if best else "",
                ]
            )
        return rows

    def check_latent(self, latent) -> int:
        try:
            latent = int(latent)
        except (TypeError, ValueError):
            raise UserError(f"{latent!r} is not a latent id; type a whole number.") from None
        if not 0 <= latent < self.cache.d_sae:
            raise UserError(f"Latent {latent} does not exist: this SAE has latents 0 to {self.cache.d_sae - 1}.")
        if self.cache.freq[latent] == 0:
            raise UserError(f"Latent {latent} never fires on the store's images: it has no top images.")
        return latent

    def images(self, latent: int, n: int = N_IMAGES_SHOWN) -> list[tuple[Image.Image, str]]:
        """The latent's top images as heatmaps, best first, with captions: the rendered PNGs when this run rendered
        them, else drawn from the cache over the original images (the gallery's rule)."""
        n = min(n, int(self.cache.n_images()[latent]))
        out = []
        for rank in range(n):
            png = os.path.join(self.dump_to, "neurons", str(latent), f"{rank}.png")
            if rank < self._shown.get(latent, 0) and os.path.isfile(png):
                with Image.open(png) as img:
                    picture = img.convert("RGB")
            else:
                picture = self.render(latent, rank)
            out.append(
                (
                    picture,
                    f"#{rank} · {self.label_of(int(self.cache.top_images[latent, rank]))} · "
                    f"{self.cache.top_values[latent, rank]:.3g}",
                )
            )
        return out

    def label_of(self, image: int) -> str:
        names, labels = self._labels
        return names[labels[image]] if image < len(labels) and 0 <= labels[image] < len(names) else ""

    @functools.cached_property
    def _labels(self) -> tuple[list[str], np.ndarray]:
        try:
            return self.store.class_names, self.store.image_labels()
        except UserError:  # older visuals that do not name their store: captions without classes
            return [], np.zeros(0, dtype=np.int64)

    @functools.cached_property
    def _geometry(self):
        from saev_core.record import vit as vitlib

        meta = self.store.metadata
        return heatmaps.geometry_of_transform(vitlib.make_img_transform(meta.vit_family, meta.vit_ckpt))

    def render(self, latent: int, rank: int) -> Image.Image:
        """One heatmap drawn from the cache, as the gallery's are."""
        image = int(self.cache.top_images[latent, rank])
        root = self.selection.get("image_root") or self.store.metadata.image_root
        path = os.path.join(root or "", self.store.image_paths()[image])
        view = render.load_view(
            path,
            self._geometry,
            fix="Have the store's images moved? Render the visuals "
            "again with images:image-folder-dataset --images.root DIR.",
        )
        return render.draw_top_image(
            self.cache, latent, rank, view, render.patch_grid(self.store.metadata.n_patches_per_img)
        )

    def histogram(self, latent: int) -> Image.Image:
        """The latent's log10 value histogram (the cache's bins) as a small picture."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4, 2.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        edges = top_images.HIST_EDGES
        ax.bar(edges[:-1], self.cache.hist[latent], width=np.diff(edges), align="edge", color="#4c72b0")
        nz = np.flatnonzero(self.cache.hist[latent])
        if len(nz):
            ax.set_xlim(edges[max(nz[0] - 1, 0)], edges[min(nz[-1] + 2, len(edges) - 1)])
        ax.set_xlabel("log10 value where it fires", fontsize=8)
        ax.set_ylabel("vectors", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def summary(self, latent: int) -> str:
        c = self.cache
        lines = [
            f"### Latent {latent}",
            f"fires on {c.freq[latent]:.3g} of the vectors ({c.identity.patches} mode) "
            f"(log10 {math.log10(c.freq[latent]):.2f}), "
            f"mean value {c.mean_value[latent]:.3g} when firing, top value {c.top_values[latent, 0]:.3g}; "
            f"{int(c.n_images()[latent])} images in its top-{c.identity.top_k}.",
        ]
        if self.assoc is not None:
            best = ", ".join(f"{name} {auroc:.2f}" for name, auroc in self.assoc.top_classes(latent))
            counts = self.assoc.top_label_counts[latent]
            top = ", ".join(
                f"{self.assoc.class_names[i]} {counts[i]}" for i in np.argsort(-counts, kind="stable")[:4] if counts[i]
            )
            lines.append(f"Classes by AUROC: {best or '–'}. Classes of its top images: {top or '–'}.")
        return "\n\n".join(lines)


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

        png = plots.l0_vs_nmse_png(self.table, f"sweep {os.path.basename(self.folder.rstrip('/'))}", chosen=member)
        return Image.open(io.BytesIO(png)).convert("RGB")

    def rows(self) -> tuple[list[list], list[str]]:
        cols = [
            c
            for c in ("member_id", "sae.arch", "sae.k", "sae.exp_factor", "lr", "l0", "nmse", "frac_dead_train")
            if c in self.table
        ]
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
