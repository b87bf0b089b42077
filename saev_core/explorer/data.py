"""The explorer's data side: one visuals folder (``LatentBook``) and one sweep (``SweepTable``), read only from the
files the visuals, train and probe jobs wrote. Imports no Gradio, so it is tested on its own.

Importing it imports no torch (nor matplotlib): the app must answer quickly, so what needs them is imported where it
is used (a visuals cache is read when the page first asks for it; the ViT only when an upload is explained)."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import inside, read_json
from saev_core.train.sweep import check_member_id

if TYPE_CHECKING:
    import pandas as pd
    from jaxtyping import Float, Int

SORT_KEYS = ("best AP", "class selectivity", "frequency", "mean value", "max value", "id")
"""The latent table's orders, in the order offered: "best AP" needs the member's patch probes (probe.json), "class
selectivity" the store's image classes (the visuals' association)."""
N_IMAGES_SHOWN = 12
N_TABLE_ROWS = 500
DENSE_FREQ = config.DENSE_FREQ
_NO_DATA = {
    "best AP": ": this member has no patch probes (`python -m saev_core probe`, into <its checkpoint folder>/probes/).",
    "class selectivity": ": the store has no classes (one image folder per class gives them).",
}


def _provenance(ckpt: str | None) -> dict:
    """A checkpoint's provenance from its header alone (no weights read); {} when there is none or it is unreadable
    (the caller then says what is missing)."""
    if ckpt is None:
        return {}
    from saev_core.nn import checkpoint

    try:
        return checkpoint.read_provenance(ckpt)
    except UserError:
        return {}


def _ckpt_file(path: str) -> str:
    """``nn.ckpt_file`` without importing torch: the path itself, or ``path/sae.pt`` for a member's folder."""
    return os.path.join(path, "sae.pt") if os.path.isdir(path) else path


def cache_file(dump_to: str) -> str:
    """The top-k cache of a visuals folder (``top_images.cache_path``, named here so that checking a folder imports
    no torch)."""
    return os.path.join(dump_to, "cache", "topk.npz")


def read_optional_json(path: str, what: str) -> tuple[dict | None, str | None]:
    """(the JSON object at ``path``, None), (None, None) when there is no file, or (None, why it was ignored) when it
    cannot be read: the explorer shows what it has and says what it left out, rather than failing."""
    try:
        doc = read_json(path)
    except (OSError, ValueError) as err:
        return None, f"{what} {path} cannot be read ({type(err).__name__}: {err}); it is left out."
    if doc is not None and not isinstance(doc, dict):
        return None, f"{what} {path} is not a JSON object; it is left out."
    return doc, None


@dataclasses.dataclass(frozen=True)
class PatchProbes:
    """A member's patch probes (``<member folder>/probes/probe.json``, written by ``python -m saev_core probe``;
    docs/probes.md): each class's best latent with its held-out AP and Purity@k, seen per latent."""

    path: str
    classes: list[dict]
    """probe.json's per-class rows (``class``, ``best_latent``, ``ap``, ``purity_at_k``, ``weight``, ...)."""
    k: int | None
    best_ap: Float[np.ndarray, " d_sae"]
    """Per latent: the highest AP among the classes whose best latent it is; NaN for a latent that is no class's
    best latent (or whose classes have no AP)."""
    best_row: Int[np.ndarray, " d_sae"]
    """The index into ``classes`` of that class (-1 where ``best_ap`` is NaN)."""

    @classmethod
    def from_doc(cls, path: str, doc: dict, d_sae: int) -> PatchProbes:
        rows = [r for r in doc.get("classes") or [] if isinstance(r, dict)]
        best_ap, best_row = np.full(d_sae, np.nan), np.full(d_sae, -1, dtype=np.int64)
        for i, row in enumerate(rows):  # file order: among equal APs the class listed first wins
            j, ap = row.get("best_latent"), row.get("ap")
            if isinstance(j, int) and 0 <= j < d_sae and isinstance(ap, (int, float)) and not ap <= best_ap[j]:
                best_ap[j], best_row[j] = float(ap), i
        return cls(path, rows, doc.get("k"), best_ap, best_row)

    def rows_of(self, latent: int) -> list[dict]:
        """The classes whose best latent this is, in file order."""
        return [r for r in self.classes if r.get("best_latent") == latent]


def probes_path(ckpt: str) -> str:
    """Where a member's patch probes are: ``<its checkpoint folder>/probes/probe.json`` (the pipeline's [probe]
    stage; ``python -m saev_core probe --dump-to <that folder>`` by hand)."""
    return os.path.join(os.path.dirname(ckpt), "probes", "probe.json")


def _probe_words(row: dict, k: int | None) -> str:
    """One class row of probe.json in words: "sky: AP 0.80, Purity@100 0.97"."""
    purity = row.get("purity_at_k")
    words = f"{row.get('class')}: AP {row['ap']:.2f}"
    if isinstance(purity, (int, float)):
        words += f", Purity@{k or 'k'} {purity:.2f}"
    if isinstance(row.get("weight"), (int, float)) and row["weight"] < 0:
        words += " (inverse: the class is where this latent is low)"
    return words


def _format_ap(row: dict) -> str:
    """ "sky (0.80)"; a negative probe weight (the class is where the latent is low) says "inverse"."""
    weight = row.get("weight")
    inverse = ", inverse" if isinstance(weight, (int, float)) and weight < 0 else ""
    return f"{row.get('class')} ({row['ap']:.2f}{inverse})"


class LatentBook:
    """One visuals folder: its top-k cache, class association and selection, the member's patch probes and training
    metrics when they sit beside its checkpoint, and how to draw its heatmaps. Each file is read when first needed."""

    def __init__(self, dump_to: str, ckpt: str | None = None):
        from saev_core.visuals import top_images

        self.dump_to = os.path.abspath(dump_to)
        cache = top_images.read_cache(self.dump_to)
        if cache is None:
            raise UserError(
                f"No top-k cache in {self.dump_to} (cache/topk.npz): pass a folder written by `python -m "
                "saev_core visuals --dump-to DIR`, or run that first."
            )
        self.cache = cache
        self.selection = read_json(os.path.join(self.dump_to, "cache", "selection.json")) or {}
        self.ckpt = ckpt or self.selection.get("ckpt")
        self.ckpt_problem = self._check_ckpt()
        self.notes: list[str] = []
        """What was found beside the checkpoint but left out (a damaged or foreign probe.json, ...)."""
        self._store = None
        self._shown = dict(zip(self.selection.get("latents", []), self.selection.get("n_images", [])))

    def _check_ckpt(self) -> str | None:
        """Why uploads cannot be explained with ``self.ckpt`` (None when they can)."""
        from saev_core.visuals import top_images

        if self.ckpt is None:
            return (
                "No SAE checkpoint is known for this folder (its selection.json predates that field); pass "
                "--ckpt to explain uploaded images."
            )
        path = _ckpt_file(self.ckpt)
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

    @functools.cached_property
    def assoc(self):
        """The latent-class association beside the cache (None when the store has no classes)."""
        from saev_core.visuals import association

        return association.load(self.dump_to, self.cache.identity)

    @functools.cached_property
    def probes(self) -> PatchProbes | None:
        """The member's patch probes, when probe.json sits beside the checkpoint of this cache and is of an SAE of
        this width; None otherwise (a reason in ``notes`` when one was found but left out)."""
        if self.ckpt_problem:
            return None
        path = probes_path(self.ckpt)
        doc, note = read_optional_json(path, "The patch probes")
        recorded = doc.get("ckpt") if doc else None
        if doc is None:
            pass
        elif doc.get("width") != self.cache.d_sae:
            note = f"The patch probes {path} are of an SAE {doc.get('width')} wide, not {self.cache.d_sae}; left out."
        elif isinstance(recorded, str) and os.path.isfile(recorded) and not os.path.samefile(recorded, self.ckpt):
            note = f"The patch probes {path} are of another checkpoint ({recorded}); left out."
        else:
            return PatchProbes.from_doc(path, doc, self.cache.d_sae)
        if note:
            self.notes.append(note)
        return None

    @functools.cached_property
    def training_metrics(self) -> dict | None:
        """The member's metrics.json (written last by training, beside the checkpoint), or None."""
        if self.ckpt_problem:
            return None
        doc, note = read_optional_json(os.path.join(os.path.dirname(self.ckpt), "metrics.json"), "The metrics")
        if note:
            self.notes.append(note)
        return doc

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

    def sort_keys(self) -> list[str]:
        """The orders this folder can offer (``SORT_KEYS`` less those whose data is missing)."""
        missing = {"best AP": self.probes is None, "class selectivity": self.assoc is None}
        return [k for k in SORT_KEYS if not missing.get(k)]

    def default_sort(self) -> str:
        """The order that shows readable features first: the patch probes' best AP when the member has them, else
        class selectivity when the store has classes, else id (an unbiased sample: every descending order of
        frequency or value puts the dense latents, heatmaps covering whole images, first)."""
        return next((k for k in ("best AP", "class selectivity") if k in self.sort_keys()), "id")

    def order(self, key: str) -> list[int]:
        """The latents that fire on the store, sorted by ``key``, largest first, ties (and latents without a value,
        last) by id. "class selectivity" (best AUROC over the classes) lists the dense latents (firing on over
        ``DENSE_FREQ`` of the vectors) after the others: a latent that fires on every image separates classes by
        its level alone and reaches AUROC 1 without picking out anything one can see."""
        ids = self.alive
        if key == "id":
            return ids.tolist()
        values = {
            "frequency": lambda: self.cache.freq,
            "mean value": lambda: self.cache.mean_value,
            "max value": lambda: self.cache.top_values[:, 0],
            "class selectivity": lambda: self.assoc.selectivity() if self.assoc is not None else None,
            "best AP": lambda: self.probes.best_ap if self.probes is not None else None,
        }.get(key, lambda: None)()
        if values is None:
            raise UserError(f"Cannot sort by {key!r}{_NO_DATA.get(key, '.')}")
        vals = np.nan_to_num(values[ids], nan=-np.inf)
        first = (self.cache.freq[ids] > DENSE_FREQ) if key == "class selectivity" else np.zeros(len(ids), bool)
        return ids[np.lexsort((ids, -vals, first))].tolist()

    def columns(self) -> list[str]:
        cols = ["latent", "log10 freq", "log10 mean", "max"]
        if self.assoc is not None:
            cols.append("best class (AUROC)")
        if self.probes is not None:
            cols.append("patch class (AP)")
        return cols

    def table(self, key: str) -> pd.DataFrame:
        """Rows for the latent table (the first ``N_TABLE_ROWS`` in ``key``'s order): id, log10 frequency, log10
        mean value, max value, best class by AUROC (with classes), best patch class by AP (with probes)."""
        import pandas as pd

        rows = []
        for latent in self.order(key)[:N_TABLE_ROWS]:
            row = [
                latent,
                round(math.log10(self.cache.freq[latent]), 3),
                round(math.log10(self.cache.mean_value[latent]), 3),
                round(float(self.cache.top_values[latent, 0]), 4),
            ]
            if self.assoc is not None:
                best = self.assoc.top_classes(latent, 1)
                row.append(f"{best[0][0]} ({best[0][1]:.2f})" if best else "")
            if self.probes is not None:
                i = self.probes.best_row[latent]
                row.append(_format_ap(self.probes.classes[i]) if i >= 0 else "")
            rows.append(row)
        return pd.DataFrame(rows, columns=self.columns())

    def describe(self) -> str:
        """The banner's facts about this folder, in words that keep "fires on the store's images" apart from
        "dead" (docs/training.md: dead = did not fire in the last ``dead_after_n_patches`` training vectors)."""
        c = self.cache
        parts = [
            f"**Visuals:** `{self.dump_to}` · layer {c.identity.layer} · {c.d_sae} latents, {len(self.alive)} fire "
            "on at least one of the store's images (the visuals pass)"
        ]
        m = self.training_metrics or {}
        if isinstance(m.get("frac_dead_train"), (int, float)):
            window = m.get("dead_window")
            n = m.get("n_dead_train")
            parts.append(
                f"**dead in training:** {m['frac_dead_train']:.1%}"
                + (f" ({n} latents)" if isinstance(n, int) else "")
                + " did not fire in the last "
                + (f"{window:,} " if isinstance(window, int) else "")
                + "training vectors (`frac_dead_train`, metrics.json)"
            )
        if self.probes is not None:
            n = int(np.isfinite(self.probes.best_ap).sum())
            parts.append(
                f"**patch probes:** held-out AP of each class's best latent ({n} latents; `{self.probes.path}`)"
            )
        return " · ".join(parts)

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
        from saev_core.visuals import heatmaps

        meta = self.store.metadata
        return heatmaps.geometry_of_transform(vitlib.make_img_transform(meta.vit_family, meta.vit_ckpt))

    def render(self, latent: int, rank: int) -> Image.Image:
        """One heatmap drawn from the cache, as the gallery's are."""
        from saev_core.visuals import latent_images

        image = int(self.cache.top_images[latent, rank])
        root = self.selection.get("image_root") or self.store.metadata.image_root
        path = os.path.join(root or "", self.store.image_paths()[image])
        view = latent_images.load_view(
            path,
            self._geometry,
            fix="Have the store's images moved? Render the visuals "
            "again with images:image-folder-dataset --images.root DIR.",
        )
        return latent_images.draw_top_image(
            self.cache, latent, rank, view, latent_images.patch_grid(self.store.metadata.n_patches_per_img)
        )

    def histogram(self, latent: int) -> Image.Image:
        """The latent's log10 value histogram (the cache's bins) as a small picture."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from saev_core.visuals import top_images

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
        if self.probes is not None:
            rows = [r for r in self.probes.rows_of(latent) if isinstance(r.get("ap"), (int, float))]
            described = "; ".join(_probe_words(r, self.probes.k) for r in rows)
            lines.append(
                f"Patch probes (held out): the best latent of {described}."
                if rows
                else "Patch probes: no class has this latent as its best."
            )
        return "\n\n".join(lines)


TABLE_COLUMNS = (
    "member_id",
    "sae.arch",
    "sae.k",
    "sae.exp_factor",
    "lr",
    "l0",
    "nmse",
    "pca_nmse_at_l0",
    "random_nmse_at_l0",
    "kmeans_nmse",
    "gain_vs_pca",
    "gain_vs_random",
    "gain_vs_kmeans",
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
        cols = [c for c in TABLE_COLUMNS if c in self.table]
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
