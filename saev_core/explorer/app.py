"""The explorer's Gradio app: ``build_app`` (the Blocks, not launched) and ``serve`` (launched on 127.0.0.1).

Nothing leaves the machine: the server binds 127.0.0.1, Gradio's analytics are off (environment and
``analytics_enabled=False``), the theme uses system fonts only (no Google Fonts), and no share link is made.
Problems (a wrong checkpoint, a cache of another SAE, an unreadable upload) are shown in the page as messages.
"""

import logging
import os
import threading

from saev_core import config
from saev_core.errors import UserError
from saev_core.explorer.latent_book import DENSE_FREQ, LatentBook
from saev_core.explorer.sweep import SweepTable, member_visuals_folder
from saev_core.record import images as imagelib
from saev_core.visuals.topk_cache import cache_path

logger = logging.getLogger("saev_core.explorer")


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
    """The app's state: the open visuals folder, the sweep, and one Explainer per checkpoint (built on first use).

    Nothing slow happens here: the visuals folder is checked for its cache file, and the cache itself is read when
    the page first asks for ``book``; torch and the ViT are loaded when an upload is first explained."""

    def __init__(self, cfg: config.ExploreConfig):
        self.cfg = cfg
        if not os.path.isfile(cache_path(cfg.visuals)):
            raise UserError(
                f"No top-k cache in {os.path.abspath(cfg.visuals)} (cache/topk.npz): pass a folder written by "
                "`python -m saev_core visuals --dump-to DIR`, or run that first."
            )
        self.books: dict[str, LatentBook] = {}
        self._open = (cfg.visuals, cfg.ckpt)
        self._lock = threading.Lock()
        self.sweep = SweepTable(cfg.sweep) if cfg.sweep else None
        self._explainers: dict[str, object] = {}

    @property
    def book(self) -> LatentBook:
        """The open visuals folder, read on first use (once, whichever request comes first)."""
        with self._lock:
            return self.open_book(*self._open)

    def open_book(self, folder: str, ckpt: str | None = None) -> LatentBook:
        key = os.path.abspath(folder)
        if key not in self.books:
            self.books[key] = LatentBook(folder, ckpt)
        return self.books[key]

    def member_book(self, member: str, progress=None) -> LatentBook:
        """Open a sweep member's visuals, rendering them first (one SAE pass) when its folder has no cache. A member
        id that is not one (``../x`` in a hand-edited sweep.csv) is refused before anything is written."""
        if self.sweep is None:
            raise UserError("No sweep is open: start the explorer with --sweep CKPT_DIR.")
        if not member:
            raise UserError("Pick a member of the sweep first.")
        ckpt = self.sweep.ckpt(member)
        folder = member_visuals_folder(self.book.dump_to, self.sweep.members, member)
        if not os.path.isfile(cache_path(folder)):
            from saev_core.visuals import render

            if progress is not None:
                progress(0, desc=f"rendering the visuals of {member} (one SAE pass over the store)")
            render.make_visuals(
                config.VisualsConfig(
                    ckpt=ckpt,
                    dump_to=folder,
                    log_freq_range=(-10.0, 0.0),
                    log_value_range=(-10.0, 10.0),
                    n_latents=50,
                    n_imgs_per_latent=6,
                    device=self.cfg.device,
                ),
                show_progress=progress is not None,
            )
        with self._lock:
            book = self.open_book(folder, ckpt)
            self._open = (folder, ckpt)
        return book

    def explainer(self, progress=None):
        book = self.book
        if book.ckpt_problem:
            raise UserError(book.ckpt_problem)
        if book.ckpt not in self._explainers:
            from saev_core.analysis.inference import Explainer

            if progress is not None:
                progress(0.1, desc="loading the ViT and the SAE")
            device = config.resolve_device(self.cfg.device)
            self._explainers[book.ckpt] = Explainer.from_checkpoint(book.ckpt, device)
        return self._explainers[book.ckpt]


def _uploaded_path(file) -> str:
    return file if isinstance(file, str) else getattr(file, "name", str(file))


def build_app(cfg: config.ExploreConfig):
    """The Gradio Blocks of the explorer (not launched). The components start empty and the page's load fills them
    (``start``), so the server answers before any cache is read."""
    _offline_env()
    import gradio as gr

    app = Explorer(cfg)

    def banner() -> str:
        book = app.book
        parts = [book.describe()]
        if book.ckpt_problem:
            parts.append(f"⚠️ {book.ckpt_problem}")
        parts += [f"⚠️ {note}" for note in book.notes]
        return "\n\n".join(parts)

    def fail(message: str, n: int):
        gr.Warning(message, duration=8)
        return (f"⚠️ {message}", *[gr.update()] * n)

    def open_current(key: str | None = None):
        """Banner, sort choices, table and first latent of the open folder, in ``key``'s order (default: the
        folder's own, ``LatentBook.default_sort``)."""
        book = app.book
        key = key or book.default_sort()
        order = book.order(key)
        return (
            banner(),
            gr.update(choices=book.sort_keys(), value=key),
            gr.update(value=book.table(key)),
            order[0] if order else None,
        )

    def start():
        try:
            return ("", *open_current())
        except UserError as err:
            return fail(str(err), 4)
        except Exception as err:  # noqa: BLE001 - shown in the page, not as a trace
            logger.exception("opening %s", cfg.visuals)
            return fail(f"Could not open {cfg.visuals}: {type(err).__name__}: {err}", 4)

    def show_latent(latent):
        if latent is None and not len(app.book.alive):
            return "No latent fires on the store's images: there is nothing to show.", "", [], None
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

    def preview(file):
        """The upload as it was sent, at once (explaining it may first load the ViT); earlier results cleared."""
        if file is None:
            return "Upload an image to see which latents fire where.", None, [], gr.update(choices=[], value=None)
        path = _uploaded_path(file)
        try:
            image = imagelib.load_rgb(path)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for files it cannot decode
            message = (
                f"Cannot read the uploaded file {os.path.basename(path)}: it is not an image Pillow can "
                f"decode ({type(err).__name__}). Upload a PNG, JPEG, WebP or another image file."
            )
            return (*fail(message, 0), None, [], gr.update(choices=[], value=None))
        return f"Explaining {os.path.basename(path)} ...", image, [], gr.update(choices=[], value=None)

    def explain(file, top_n, progress=gr.Progress()):  # noqa: B008 (Gradio injects the tracker through this default)
        if file is None:
            return "Upload an image to see which latents fire where.", [], gr.update(choices=[], value=None)
        path = _uploaded_path(file)
        try:
            image = imagelib.load_rgb(path)
        except Exception:  # noqa: BLE001 - the preview has said why
            return gr.update(), [], gr.update(choices=[], value=None)
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
        pictures = [(img, f"latent {j} · {v:.3g}") for img, j, v in zip(out.heatmaps[0], latents, values)]
        choices = [(f"latent {j} ({v:.3g})", j) for j, v in zip(latents, values) if v > 0]
        message = (
            (
                f"{os.path.basename(path)}: its {len(choices)} strongest latents (of "
                f"{int((out.image_values[0] > 0).sum())} that fire on it). Pick one below to open its top images."
            )
            if choices
            else f"{os.path.basename(path)}: no latent fires on this image."
        )
        return message, pictures, gr.update(choices=choices, value=None)

    def jump(latent):
        if latent is None:
            return (gr.update(), gr.update(), *[gr.update()] * 4)
        return (gr.Tabs(selected="latents"), latent, *show_latent(latent))

    def open_member(member, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (as above)
        try:
            app.member_book(member, progress)
            current = open_current()
        except UserError as err:
            return fail(str(err), 6)
        except Exception as err:  # noqa: BLE001
            logger.exception("opening member %s", member)
            return fail(f"Could not open member {member}: {type(err).__name__}: {err}", 6)
        banner_text, *rest = current
        return ("", banner_text, gr.Tabs(selected="latents"), *rest, gr.update(value=app.sweep.plot(member)))

    def sweep_plot():
        try:
            return gr.update(value=app.sweep.plot(os.path.basename(app.book.dump_to)))
        except Exception:  # noqa: BLE001 - the tab still has its table; the error is in the log
            logger.exception("drawing the sweep plot")
            return gr.update()

    with gr.Blocks(title="SAE explorer", analytics_enabled=False) as blocks:
        gr.Markdown("# SAE explorer")
        top = gr.Markdown("Reading the visuals ...", elem_id="banner")
        with gr.Tabs(selected="latents") as tabs:
            with gr.Tab("Latents", id="latents"):
                latent_status = gr.Markdown(elem_id="latent-status")
                with gr.Row():
                    with gr.Column(scale=1):
                        sort = gr.Radio(
                            [],
                            label="Sort latents by",
                            info="best AP: the patch probes' held-out AP of the classes a latent is best for; class "
                            f"selectivity: best AUROC over the store's classes, dense latents (firing on over "
                            f"{DENSE_FREQ:.0%} of vectors) last",
                            elem_id="sort",
                        )
                        table = gr.Dataframe(
                            interactive=False,
                            max_height=480,
                            wrap=True,
                            elem_id="latent-table",
                            label="Latents that fire on the store's images (click one)",
                        )
                    with gr.Column(scale=1):
                        with gr.Row():
                            latent_id = gr.Number(label="Latent id", precision=0, elem_id="latent-id")
                            show = gr.Button("Show", variant="primary", elem_id="show-latent")
                        summary = gr.Markdown(elem_id="latent-summary")
                        pictures = gr.Gallery(
                            label="Top images (heatmaps, best first)",
                            columns=4,
                            height="auto",
                            elem_id="latent-images",
                            object_fit="contain",
                        )
                        hist = gr.Image(
                            label="Value histogram", interactive=False, elem_id="latent-hist", type="pil", height=240
                        )
            with gr.Tab("Explain an image", id="explain"):
                explain_status = gr.Markdown(
                    "Upload an image to see which latents fire where.", elem_id="explain-status"
                )
                with gr.Row():
                    with gr.Column(scale=1, elem_id="upload-column"):
                        upload = gr.UploadButton(
                            "Upload an image (PNG, JPEG, ...)",
                            file_count="single",
                            type="filepath",
                            variant="primary",
                            elem_id="upload",
                        )
                        uploaded = gr.Image(
                            label="Your image",
                            interactive=False,
                            type="pil",
                            height=240,
                            elem_id="upload-preview",
                        )
                        top_n = gr.Slider(1, 24, value=8, step=1, label="Top latents")
                    with gr.Column(scale=3):
                        explained = gr.Gallery(
                            label="Where its top latents fire",
                            columns=4,
                            height="auto",
                            elem_id="explain-images",
                            object_fit="contain",
                        )
                        jump_to = gr.Radio([], label="Open a latent's top images", elem_id="jump-pick")
            with gr.Tab("Sweep", id="sweep", visible=app.sweep is not None):
                sweep_status = gr.Markdown(elem_id="sweep-status")
                if app.sweep is not None:
                    rows, cols = app.sweep.rows()
                    if app.sweep.notes:
                        gr.Markdown("\n\n".join(f"⚠️ {note}" for note in app.sweep.notes))
                    with gr.Row():
                        with gr.Column():
                            gr.Markdown(
                                "L0 vs NMSE on the held-out split"
                                + (
                                    ", with the PCA baseline (PCA with L0 components: a member below the line beats "
                                    "it at matched L0)"
                                    if app.sweep.pca_nmse is not None
                                    else " (no controls.json beside sweep.csv: no PCA baseline)"
                                ),
                                elem_id="sweep-plot-caption",
                            )
                            plot = gr.Image(
                                show_label=False, interactive=False, elem_id="sweep-plot", type="pil", height=380
                            )
                        with gr.Column():
                            member = gr.Radio(app.sweep.choices(), label="Member", elem_id="member-pick")
                            open_btn = gr.Button("Open this member's latents", variant="primary", elem_id="open-member")
                    gr.Dataframe(rows, headers=cols, interactive=False, elem_id="sweep-table")

        latent_outputs = [latent_status, summary, pictures, hist]
        show.click(show_latent, latent_id, latent_outputs)
        latent_id.submit(show_latent, latent_id, latent_outputs)
        sort.input(resort, sort, [latent_status, table])
        table.select(pick_row, table, [latent_id, *latent_outputs])
        explain_outputs = [explain_status, explained, jump_to]
        upload.upload(preview, upload, [explain_status, uploaded, explained, jump_to]).then(
            explain, [upload, top_n], explain_outputs
        )
        top_n.release(explain, [upload, top_n], explain_outputs)
        jump_to.input(jump, jump_to, [tabs, latent_id, *latent_outputs])
        loaded = blocks.load(start, None, [latent_status, top, sort, table, latent_id]).then(
            show_latent, latent_id, latent_outputs
        )
        if app.sweep is not None:
            loaded.then(sweep_plot, None, plot)
            member.change(lambda m: app.sweep.plot(m) if m else gr.update(), member, plot)
            open_btn.click(open_member, member, [sweep_status, top, tabs, sort, table, latent_id, plot]).then(
                show_latent, latent_id, latent_outputs
            )
    blocks.saev_explorer = app
    return blocks


def _prefetch(app: Explorer) -> None:
    """Once the server answers: read what the first page shows (the cache, the first latent's images), so that it
    is ready or under way when a browser asks. Errors are left for the page to report."""
    try:
        book = app.book
        order = book.order(book.default_sort())
        if order:
            book.images(order[0])
    except Exception:  # noqa: BLE001 - the page's own request raises it again and shows it
        logger.debug("prefetch failed", exc_info=True)


def serve(cfg: config.ExploreConfig, block: bool = True):
    """Launch the app on 127.0.0.1 and print its address; returns the address."""
    blocks = build_app(cfg)
    _, url, _ = blocks.launch(
        server_name="127.0.0.1",
        server_port=cfg.port or None,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        show_error=False,
        theme=local_theme(),
        prevent_thread_lock=True,
        quiet=True,
        footer_links=[],
        run_history=False,
        mcp_server=False,
    )
    print(f"explorer on {url} (127.0.0.1 only; Ctrl-C stops it)", flush=True)
    threading.Thread(target=_prefetch, args=(blocks.saev_explorer,), daemon=True).start()
    if block:
        try:
            blocks.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            blocks.close()
    return url
