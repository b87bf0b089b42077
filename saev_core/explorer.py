"""The explorer: a local Gradio app over a visuals folder (``python -m saev_core explore``).

Three tabs: **Latents** (every live latent, sorted by frequency, mean value, max value, id or class selectivity; its
top images as heatmaps and its value histogram, all from the top-k cache, with no SAE pass), **Explain an image**
(upload an image: where its top latents fire, via ``inference.Explainer``; pick one to open its top images) and
**Sweep** (the members of a sweep on an L0-vs-NMSE plot; open one member's latents, rendering its visuals first when
it has none). The data side (``LatentBook``, ``SweepTable``) imports no Gradio and is tested on its own.

Nothing leaves the machine: the server binds 127.0.0.1, Gradio's analytics are off (environment and
``analytics_enabled=False``), the theme uses system fonts only (no Google Fonts), and no share link is made.
Problems (a wrong checkpoint, a cache of another SAE, an unreadable upload) are shown in the page as messages.
"""

import dataclasses
import functools
import io
import logging
import math
import os

import numpy as np
from PIL import Image

from saev_core import config, nn
from saev_core.visuals import association
from saev_core.visuals import heatmaps
from saev_core.record import images as imagelib
from saev_core.visuals import top_images
from saev_core.visuals import render
from saev_core.errors import UserError
from saev_core.files import read_json

logger = logging.getLogger("saev_core.explorer")
SORT_KEYS = ("frequency", "mean value", "max value", "id", "class selectivity")
N_IMAGES_SHOWN = 12
N_TABLE_ROWS = 500


# ----------------------------------------------------------------------------------------------------------------
# Data: one visuals folder, one sweep
# ----------------------------------------------------------------------------------------------------------------


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
            raise UserError(f"No top-k cache in {self.dump_to} (cache/topk.npz): pass a folder written by `python -m "
                            "saev_core visuals --dump-to DIR`, or run that first.")
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
            return ("No SAE checkpoint is known for this folder (its selection.json predates that field); pass "
                    "--ckpt to explain uploaded images.")
        path = nn.ckpt_file(self.ckpt)
        if not os.path.isfile(path):
            return f"The checkpoint {path} does not exist; pass --ckpt with the SAE of {self.dump_to}."
        if top_images.file_sha256(path) != self.cache.identity.sae_sha256:
            return (f"The visuals cache in {self.dump_to} was made from another SAE than {path} (their SHA-256 "
                    "differ), so its latents are not that checkpoint's. Pass --ckpt with the SAE the visuals were "
                    "made from, or render visuals of this one (`python -m saev_core visuals --ckpt ...`).")
        self.ckpt = path
        return None

    @property
    def store(self):
        """The activation store (opened when a heatmap has to be drawn from the cache: its image list and ViT)."""
        if self._store is None:
            from saev_core.store import ActivationStore

            path = self.selection.get("store") or _provenance(self.ckpt).get("store")
            if path is None:
                raise UserError(f"{self.dump_to}/cache/selection.json does not name the store (older visuals); render "
                                "the visuals again to browse latents beyond the rendered ones.")
            self._store = ActivationStore.open(path)
        return self._store

    @property
    def alive(self) -> np.ndarray:
        return np.flatnonzero(self.cache.freq > 0)

    def order(self, key: str) -> list[int]:
        """The live latents sorted by ``key`` (largest first, ids ascending), ties broken by id."""
        ids = self.alive
        if key == "id":
            return ids.tolist()
        values = {
            "frequency": self.cache.freq, "mean value": self.cache.mean_value,
            "max value": self.cache.top_values[:, 0],
            "class selectivity": self.assoc.selectivity() if self.assoc is not None else None,
        }.get(key)
        if values is None:
            raise UserError(f"Cannot sort by {key!r}" + (": the store has no classes (one image folder per class "
                                                         "gives them)." if key == "class selectivity" else "."))
        vals = np.nan_to_num(values[ids], nan=-np.inf)
        return ids[np.lexsort((ids, -vals))].tolist()

    def table(self, key: str) -> list[list]:
        """Rows for the latent table: id, log10 frequency, log10 mean value, max value, best class."""
        rows = []
        for latent in self.order(key)[:N_TABLE_ROWS]:
            best = self.assoc.top_classes(latent, 1) if self.assoc is not None else []
            rows.append([latent, round(math.log10(self.cache.freq[latent]), 3),
                         round(math.log10(self.cache.mean_value[latent]), 3),
                         round(float(self.cache.top_values[latent, 0]), 4),
                         f"{best[0][0]} ({best[0][1]:.2f})" if best else ""])
        return rows

    def check_latent(self, latent) -> int:
        try:
            latent = int(latent)
        except (TypeError, ValueError):
            raise UserError(f"{latent!r} is not a latent id; type a whole number.") from None
        if not 0 <= latent < self.cache.d_sae:
            raise UserError(f"Latent {latent} does not exist: this SAE has latents 0 to {self.cache.d_sae - 1}.")
        if self.cache.freq[latent] == 0:
            raise UserError(f"Latent {latent} never fires on the store's images (a dead latent): it has no top images.")
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
            out.append((picture, f"#{rank} · {self.label_of(int(self.cache.top_images[latent, rank]))} · "
                                 f"{self.cache.top_values[latent, rank]:.3g}"))
        return out

    def label_of(self, image: int) -> str:
        names, labels = self._labels()
        return names[labels[image]] if image < len(labels) and 0 <= labels[image] < len(names) else ""

    @functools.cache
    def _labels(self) -> tuple[list[str], np.ndarray]:
        try:
            return self.store.class_names, self.store.image_labels()
        except UserError:  # older visuals that do not name their store: captions without classes
            return [], np.zeros(0, dtype=np.int64)

    @functools.cache
    def _geometry(self):
        from saev_core.record import vit as vitlib

        meta = self.store.metadata
        return heatmaps.geometry_of_transform(vitlib.make_img_transform(meta.vit_family, meta.vit_ckpt))

    def render(self, latent: int, rank: int) -> Image.Image:
        """One heatmap drawn from the cache, as the gallery's are."""
        image = int(self.cache.top_images[latent, rank])
        root = self.selection.get("image_root") or self.store.metadata.image_root
        path = os.path.join(root or "", self.store.image_paths()[image])
        view = render.load_view(path, self._geometry(), fix="Have the store's images moved? Render the visuals "
                                 "again with images:image-folder-dataset --images.root DIR.")
        return render.draw_top_image(self.cache, latent, rank, view,
                                      render.patch_grid(self.store.metadata.n_patches_per_img))

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
        lines = [f"### Latent {latent}",
                 f"fires on {c.freq[latent]:.3g} of the vectors ({c.identity.patches} mode) (log10 {math.log10(c.freq[latent]):.2f}), "
                 f"mean value {c.mean_value[latent]:.3g} when firing, top value {c.top_values[latent, 0]:.3g}; "
                 f"{int(c.n_images()[latent])} images in its top-{c.identity.top_k}."]
        if self.assoc is not None:
            best = ", ".join(f"{name} {auroc:.2f}" for name, auroc in self.assoc.top_classes(latent))
            counts = self.assoc.top_label_counts[latent]
            top = ", ".join(f"{self.assoc.class_names[i]} {counts[i]}" for i in np.argsort(-counts, kind="stable")[:4]
                            if counts[i])
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
        self.table = pd.read_csv(path)

    @property
    def members(self) -> list[str]:
        return [str(m) for m in self.table["member_id"]]

    def choices(self) -> list[tuple[str, str]]:
        return [(f"{r['member_id']} · {r.get('sae.arch', '')} · L0 {r['l0']:.1f} · NMSE {r['nmse']:.3f}",
                 str(r["member_id"])) for _, r in self.table.iterrows()]

    def plot(self, member: str | None = None) -> Image.Image:
        from saev_core.analysis import plots

        png = plots.l0_vs_nmse_png(self.table, f"sweep {os.path.basename(self.folder.rstrip('/'))}", chosen=member)
        return Image.open(io.BytesIO(png)).convert("RGB")

    def rows(self) -> tuple[list[list], list[str]]:
        cols = [c for c in ("member_id", "sae.arch", "sae.k", "sae.exp_factor", "lr", "l0", "nmse", "frac_dead_train")
                if c in self.table]
        return self.table[cols].round(4).values.tolist(), cols

    def ckpt(self, member: str) -> str:
        row = self.table[self.table["member_id"].astype(str) == member]
        if row.empty:
            raise UserError(f"{member!r} is not a member of the sweep in {self.folder}.")
        return str(row.iloc[0]["ckpt"])


def member_visuals_folder(visuals: str, members: list[str], member: str) -> str:
    """Where a member's visuals are (or go): beside the opened folder when that is a member's (the pipeline's
    ``<dump_to>/layer_<L>/<member_id>`` layout), else ``<visuals>/sweep_members/<member_id>``."""
    visuals = os.path.abspath(visuals)
    if os.path.basename(visuals) in members:
        return os.path.join(os.path.dirname(visuals), member)
    return os.path.join(visuals, "sweep_members", member)


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------


def _offline_env() -> None:
    """Before Gradio is imported: no telemetry, no update check, no hub calls."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def local_theme():
    """Gradio's base theme with system fonts only (the default themes may fetch web fonts)."""
    import gradio as gr

    return gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class Explorer:
    """The app's state: the open visuals folder, the sweep, and one Explainer per checkpoint (built on first use)."""

    def __init__(self, cfg: config.ExploreConfig):
        self.cfg = cfg
        self.device = config.resolve_device(cfg.device)
        self.books: dict[str, LatentBook] = {}
        self.book = self.open_book(cfg.visuals, cfg.ckpt)
        self.sweep = SweepTable(cfg.sweep) if cfg.sweep else None
        self._explainers: dict[str, object] = {}

    def open_book(self, folder: str, ckpt: str | None = None) -> LatentBook:
        key = os.path.abspath(folder)
        if key not in self.books:
            self.books[key] = LatentBook(folder, ckpt)
        return self.books[key]

    def explainer(self, progress=None):
        book = self.book
        if book.ckpt_problem:
            raise UserError(book.ckpt_problem)
        if book.ckpt not in self._explainers:
            from saev_core.analysis.inference import Explainer

            if progress is not None:
                progress(0.1, desc="loading the ViT and the SAE")
            self._explainers[book.ckpt] = Explainer.from_checkpoint(book.ckpt, self.device)
        return self._explainers[book.ckpt]


def build_app(cfg: config.ExploreConfig):
    """The Gradio Blocks of the explorer (not launched)."""
    _offline_env()
    import gradio as gr

    app = Explorer(cfg)

    def banner() -> str:
        book = app.book
        parts = [f"**Visuals:** `{book.dump_to}` · layer {book.cache.identity.layer} · {book.cache.d_sae} latents, "
                 f"{len(book.alive)} live"]
        if book.ckpt_problem:
            parts.append(f"⚠️ {book.ckpt_problem}")
        return "\n\n".join(parts)

    def fail(message: str, n: int):
        gr.Warning(message, duration=8)
        return (f"⚠️ {message}", *[gr.update()] * n)

    def sort_keys() -> list[str]:
        return [k for k in SORT_KEYS if k != "class selectivity" or app.book.assoc is not None]

    def show_latent(latent):
        try:
            latent = app.book.check_latent(latent)
            pictures = app.book.images(latent)
            return "", app.book.summary(latent), pictures, app.book.histogram(latent)
        except UserError as err:
            return fail(str(err), 3)
        except Exception as err:  # noqa: BLE001 - shown in the page, not as a trace
            logger.exception("showing latent %s", latent)
            return fail(f"Could not show latent {latent}: {type(err).__name__}: {err}", 3)

    def resort(key):
        try:
            return "", gr.update(value=app.book.table(key))
        except UserError as err:
            return fail(str(err), 1)

    def pick_row(evt: gr.SelectData, table):
        try:
            row = evt.index[0]
            latent = int(table.iloc[row, 0]) if hasattr(table, "iloc") else int(table[row][0])
        except Exception:  # noqa: BLE001 - a click outside the rows
            return tuple(gr.update() for _ in range(5))
        return (latent, *show_latent(latent))

    def explain(file, top_n, progress=gr.Progress()):
        if file is None:
            return "Upload an image to see which latents fire where.", [], gr.update(choices=[], value=None)
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        try:
            image = imagelib.load_rgb(path)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for files it cannot decode
            return fail(f"Cannot read the uploaded file {os.path.basename(path)}: it is not an image Pillow can "
                        f"decode ({type(err).__name__}). Upload a PNG, JPEG, WebP or another image file.", 2)
        try:
            explainer = app.explainer(progress)
            progress(0.6, desc="encoding the image")
            out = explainer([image], top_n=int(top_n), batch_size=1)
        except UserError as err:
            return fail(str(err), 2)
        except Exception as err:  # noqa: BLE001
            logger.exception("explaining %s", path)
            return fail(f"Could not explain the upload: {type(err).__name__}: {err}", 2)
        latents, values = out.top_latents[0].tolist(), out.top_values[0].tolist()
        pictures = [(img, f"latent {l} · {v:.3g}") for img, l, v in zip(out.heatmaps[0], latents, values)]
        choices = [(f"latent {l} ({v:.3g})", l) for l, v in zip(latents, values) if v > 0]
        message = (f"The image's {len(choices)} strongest latents (of {int((out.image_values[0] > 0).sum())} that fire "
                   "on it). Pick one below to open its top images.") if choices else "No latent fires on this image."
        return message, pictures, gr.update(choices=choices, value=None)

    def jump(latent):
        if latent is None:
            return (gr.update(), gr.update(), *[gr.update()] * 4)
        return (gr.Tabs(selected="latents"), latent, *show_latent(latent))

    def open_member(member, progress=gr.Progress(track_tqdm=True)):
        if app.sweep is None:
            return fail("No sweep is open: start the explorer with --sweep CKPT_DIR.", 6)
        if not member:
            return fail("Pick a member of the sweep first.", 6)
        try:
            ckpt = app.sweep.ckpt(member)
            folder = member_visuals_folder(app.book.dump_to, app.sweep.members, member)
            if top_images.read_cache(folder) is None:
                from saev_core.visuals import render

                progress(0, desc=f"rendering the visuals of {member} (one SAE pass over the store)")
                render.make_visuals(config.VisualsConfig(
                    ckpt=ckpt, dump_to=folder, log_freq_range=(-10.0, 0.0), log_value_range=(-10.0, 10.0),
                    n_latents=50, n_imgs_per_latent=6, device=cfg.device), show_progress=True)
            app.book = app.open_book(folder, ckpt)
        except UserError as err:
            return fail(str(err), 6)
        except Exception as err:  # noqa: BLE001
            logger.exception("opening member %s", member)
            return fail(f"Could not open member {member}: {type(err).__name__}: {err}", 6)
        first = app.book.order("frequency")[0]
        return ("", banner(), gr.Tabs(selected="latents"),
                gr.update(choices=sort_keys(), value="frequency"), gr.update(value=app.book.table("frequency")),
                first, gr.update(value=app.sweep.plot(member)))

    with gr.Blocks(title="SAE explorer", analytics_enabled=False) as blocks:
        gr.Markdown("# SAE explorer")
        top = gr.Markdown(banner(), elem_id="banner")
        with gr.Tabs(selected="latents") as tabs:
            with gr.Tab("Latents", id="latents"):
                latent_status = gr.Markdown(elem_id="latent-status")
                with gr.Row():
                    with gr.Column(scale=2):
                        sort = gr.Radio(sort_keys(), value="frequency", label="Sort latents by", elem_id="sort")
                        table = gr.Dataframe(
                            app.book.table("frequency"), headers=["latent", "log10 freq", "log10 mean", "max",
                                                                  "best class (AUROC)"],
                            interactive=False, max_height=420, elem_id="latent-table", label="Live latents (click one)")
                    with gr.Column(scale=3):
                        with gr.Row():
                            latent_id = gr.Number(label="Latent id", precision=0, elem_id="latent-id",
                                                  value=app.book.order("frequency")[0])
                            show = gr.Button("Show", variant="primary", elem_id="show-latent")
                        summary = gr.Markdown(elem_id="latent-summary")
                        pictures = gr.Gallery(label="Top images (heatmaps, best first)", columns=4, height="auto",
                                              elem_id="latent-images", object_fit="contain")
                        hist = gr.Image(label="Value histogram", interactive=False, elem_id="latent-hist",
                                        type="pil", height=240)
            with gr.Tab("Explain an image", id="explain"):
                explain_status = gr.Markdown("Upload an image to see which latents fire where.",
                                             elem_id="explain-status")
                with gr.Row():
                    upload = gr.File(label="Image (PNG, JPEG, ...)", elem_id="upload", file_count="single",
                                     type="filepath")
                    top_n = gr.Slider(1, 24, value=8, step=1, label="Top latents")
                explained = gr.Gallery(label="Where its top latents fire", columns=4, height="auto",
                                       elem_id="explain-images", object_fit="contain")
                jump_to = gr.Radio([], label="Open a latent's top images", elem_id="jump-pick")
            with gr.Tab("Sweep", id="sweep", visible=app.sweep is not None):
                sweep_status = gr.Markdown(elem_id="sweep-status")
                if app.sweep is not None:
                    rows, cols = app.sweep.rows()
                    with gr.Row():
                        plot = gr.Image(app.sweep.plot(os.path.basename(app.book.dump_to)), label="L0 vs NMSE (held out)", interactive=False,
                                        elem_id="sweep-plot", type="pil")
                        with gr.Column():
                            member = gr.Radio(app.sweep.choices(), label="Member", elem_id="member-pick")
                            open_btn = gr.Button("Open this member's latents", variant="primary",
                                                 elem_id="open-member")
                    gr.Dataframe(rows, headers=cols, interactive=False, elem_id="sweep-table")

        latent_outputs = [latent_status, summary, pictures, hist]
        show.click(show_latent, latent_id, latent_outputs)
        latent_id.submit(show_latent, latent_id, latent_outputs)
        sort.change(resort, sort, [latent_status, table])
        table.select(pick_row, table, [latent_id, *latent_outputs])
        upload.change(explain, [upload, top_n], [explain_status, explained, jump_to])
        jump_to.change(jump, jump_to, [tabs, latent_id, *latent_outputs])
        if app.sweep is not None:
            member.change(lambda m: app.sweep.plot(m) if m else gr.update(), member, plot)
            open_btn.click(open_member, member, [sweep_status, top, tabs, sort, table, latent_id, plot]).then(
                show_latent, latent_id, latent_outputs)
        blocks.load(show_latent, latent_id, latent_outputs)
    return blocks


def serve(cfg: config.ExploreConfig, block: bool = True):
    """Launch the app on 127.0.0.1 and print its address; returns the address."""
    blocks = build_app(cfg)
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=cfg.port or None, share=False, inbrowser=False,
                              ssr_mode=False, show_error=False, theme=local_theme(), prevent_thread_lock=True,
                              quiet=True, footer_links=[], run_history=False, mcp_server=False)
    print(f"explorer on {url} (127.0.0.1 only; Ctrl-C stops it)", flush=True)
    if block:
        try:
            blocks.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            blocks.close()
    return url
