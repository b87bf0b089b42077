"""One visuals folder as the explorer shows it (``LatentBook``): its top-k cache, class association and selection,
the member's patch probes and training metrics when they sit beside its checkpoint, the orders of the latent table,
and each latent's heatmaps, histogram and summary. Each file is read when first needed; importing this module
imports no torch (nor matplotlib), so the app answers before any of it is read, and showing a latent the visuals job
rendered imports neither torch nor scipy (``topk_cache``, ``association_cache``): only drawing one it did not render
loads the ViT's resize and crop (open_clip, torch)."""

from __future__ import annotations

import functools
import io
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from saev_core import config
from saev_core.errors import UserError
from saev_core.explorer.probes import PatchProbes, format_ap, probe_words, probes_path
from saev_core.explorer.reading import ckpt_file, provenance, read_optional_json
from saev_core.files import read_json

if TYPE_CHECKING:
    import pandas as pd

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


class LatentBook:
    """One visuals folder: its top-k cache, class association and selection, the member's patch probes and training
    metrics when they sit beside its checkpoint, and how to draw its heatmaps. Each file is read when first needed."""

    def __init__(self, dump_to: str, ckpt: str | None = None):
        from saev_core.visuals import topk_cache

        self.dump_to = os.path.abspath(dump_to)
        cache = topk_cache.read_cache(self.dump_to)
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
        from saev_core.visuals import topk_cache

        if self.ckpt is None:
            return (
                "No SAE checkpoint is known for this folder (its selection.json predates that field); pass "
                "--ckpt to explain uploaded images."
            )
        path = ckpt_file(self.ckpt)
        if not os.path.isfile(path):
            return f"The checkpoint {path} does not exist; pass --ckpt with the SAE of {self.dump_to}."
        if topk_cache.file_sha256(path) != self.cache.identity.sae_sha256:
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
        from saev_core.visuals import association_cache

        return association_cache.load(self.dump_to, self.cache.identity)

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

            path = self.selection.get("store") or provenance(self.ckpt).get("store")
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
                row.append(format_ap(self.probes.classes[i]) if i >= 0 else "")
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

        from saev_core.visuals import topk_cache

        fig = Figure(figsize=(4, 2.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        edges = topk_cache.HIST_EDGES
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
            described = "; ".join(probe_words(r, self.probes.k) for r in rows)
            lines.append(
                f"Patch probes (held out): the best latent of {described}."
                if rows
                else "Patch probes: no class has this latent as its best."
            )
        return "\n\n".join(lines)
