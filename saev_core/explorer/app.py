"""The explorer's Gradio app: ``build_app`` (the Blocks, not launched) and ``serve`` (launched on 127.0.0.1).

Nothing leaves the machine: the server binds 127.0.0.1, Gradio's analytics are off (environment and
``analytics_enabled=False``), the theme uses system fonts only (no Google Fonts), and no share link is made.
Problems (a wrong checkpoint, a cache of another SAE, an unreadable upload) are shown in the page as messages.
"""

import logging
import os

from saev_core import config
from saev_core.errors import UserError
from saev_core.explorer.data import SORT_KEYS, LatentBook, SweepTable, member_visuals_folder
from saev_core.record import images as imagelib
from saev_core.visuals import top_images

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

    def member_book(self, member: str, progress=None) -> LatentBook:
        """Open a sweep member's visuals, rendering them first (one SAE pass) when its folder has no cache. A member
        id that is not one (``../x`` in a hand-edited sweep.csv) is refused before anything is written."""
        if self.sweep is None:
            raise UserError("No sweep is open: start the explorer with --sweep CKPT_DIR.")
        if not member:
            raise UserError("Pick a member of the sweep first.")
        ckpt = self.sweep.ckpt(member)
        folder = member_visuals_folder(self.book.dump_to, self.sweep.members, member)
        if top_images.read_cache(folder) is None:
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
        self.book = self.open_book(folder, ckpt)
        return self.book

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
        parts = [
            f"**Visuals:** `{book.dump_to}` · layer {book.cache.identity.layer} · {book.cache.d_sae} latents, "
            f"{len(book.alive)} fire on the store's images"
        ]
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

    def explain(file, top_n, progress=gr.Progress()):  # noqa: B008 (Gradio injects the tracker through this default)
        if file is None:
            return "Upload an image to see which latents fire where.", [], gr.update(choices=[], value=None)
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        try:
            image = imagelib.load_rgb(path)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for files it cannot decode
            return fail(
                f"Cannot read the uploaded file {os.path.basename(path)}: it is not an image Pillow can "
                f"decode ({type(err).__name__}). Upload a PNG, JPEG, WebP or another image file.",
                2,
            )
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
                f"The image's {len(choices)} strongest latents (of {int((out.image_values[0] > 0).sum())} that fire "
                "on it). Pick one below to open its top images."
            )
            if choices
            else "No latent fires on this image."
        )
        return message, pictures, gr.update(choices=choices, value=None)

    def jump(latent):
        if latent is None:
            return (gr.update(), gr.update(), *[gr.update()] * 4)
        return (gr.Tabs(selected="latents"), latent, *show_latent(latent))

    def open_member(member, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (as above)
        try:
            app.member_book(member, progress)
        except UserError as err:
            return fail(str(err), 6)
        except Exception as err:  # noqa: BLE001
            logger.exception("opening member %s", member)
            return fail(f"Could not open member {member}: {type(err).__name__}: {err}", 6)
        first = app.book.order("frequency")[0]
        return (
            "",
            banner(),
            gr.Tabs(selected="latents"),
            gr.update(choices=sort_keys(), value="frequency"),
            gr.update(value=app.book.table("frequency")),
            first,
            gr.update(value=app.sweep.plot(member)),
        )

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
                            app.book.table("frequency"),
                            headers=["latent", "log10 freq", "log10 mean", "max", "best class (AUROC)"],
                            interactive=False,
                            max_height=420,
                            elem_id="latent-table",
                            label="Live latents (click one)",
                        )
                    with gr.Column(scale=3):
                        with gr.Row():
                            latent_id = gr.Number(
                                label="Latent id",
                                precision=0,
                                elem_id="latent-id",
                                value=app.book.order("frequency")[0],
                            )
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
                    upload = gr.File(
                        label="Image (PNG, JPEG, ...)", elem_id="upload", file_count="single", type="filepath"
                    )
                    top_n = gr.Slider(1, 24, value=8, step=1, label="Top latents")
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
                    with gr.Row():
                        plot = gr.Image(
                            app.sweep.plot(os.path.basename(app.book.dump_to)),
                            label="L0 vs NMSE (held out)",
                            interactive=False,
                            elem_id="sweep-plot",
                            type="pil",
                        )
                        with gr.Column():
                            member = gr.Radio(app.sweep.choices(), label="Member", elem_id="member-pick")
                            open_btn = gr.Button("Open this member's latents", variant="primary", elem_id="open-member")
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
                show_latent, latent_id, latent_outputs
            )
        blocks.load(show_latent, latent_id, latent_outputs)
    return blocks


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
    if block:
        try:
            blocks.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            blocks.close()
    return url
