"""The page: prompt, seed, steps → Draft (coarse image and proposed regions) → edit → Realign (coarse and final).

Each browser session holds its own ``SessionView`` in a ``gr.State``; the pipeline (``AppEngine``) is shared and
serialises its calls. Every handler turns a bad input into a message in the page (a notice and the status line,
no traceback) and leaves every other output as it was, so the previous result stays on screen.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image

from .engine import AppEngine
from .session import (
    AppLayout,
    RealignSettings,
    add_region,
    box_mask,
    check_draft_settings,
    check_realign_settings,
    delete_region,
    layout_from_json,
    layout_to_json,
    painted_mask,
    region_label,
    regions_markdown,
    rename_region,
    resized_mask,
)

logger = logging.getLogger(__name__)

# Images smaller than this (the shapes world draws 64 px) are shown enlarged, pixel for pixel.
DISPLAY_SIDE = 256


@dataclass(frozen=True)
class SessionView:
    """One browser session: its layout, the coarse image of its draft, its last final image and verdicts."""

    layout: AppLayout | None = None
    coarse_image: PIL.Image.Image | None = None
    final_image: PIL.Image.Image | None = None
    verdicts: str = ""
    status: str = ""


def display_scale(height: int, width: int) -> int:
    """The integer factor that shows an image at about ``DISPLAY_SIDE`` pixels (1 for large images)."""
    return max(1, DISPLAY_SIDE // max(height, width))


def enlarged(image: PIL.Image.Image, scale: int) -> PIL.Image.Image:
    """``image`` enlarged ``scale`` times, nearest neighbour (each pixel a visible square)."""
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)


def _page_errors(handler: Callable[..., Any], num_outputs: int, status_position: int) -> Callable[..., Any]:
    """Show a handler's error in the page (a notice and the status line) and change nothing else: every other
    output is skipped, so the previous result stays on screen. Bad input gives the pipeline's own message; an
    unforeseen failure a short line, its traceback going to the server's log only."""

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except (ValueError, TypeError) as error:
            message = str(error)
        except Exception as error:
            logger.exception("realign app: %s failed", handler.__name__)
            message = f"{type(error).__name__}: {error} (the server log has the details)"
        gr.Warning(message, title="Not changed")
        outputs = [gr.skip()] * num_outputs
        outputs[status_position] = f"**Not changed:** {message}"
        return tuple(outputs)

    return wrapped


def _require_layout(view: SessionView | None) -> AppLayout:
    if view is None or view.layout is None:
        raise ValueError("there is no layout yet: press Draft first, or upload a layout file.")
    return view.layout


class Page:
    """The handlers of one page, bound to one engine; the per-session data travels in ``SessionView``."""

    def __init__(self, engine: AppEngine, files_folder: Path) -> None:
        self.engine = engine
        self.files_folder = files_folder
        self.height, self.width = engine.image_size()
        self.scale = display_scale(self.height, self.width)

    # -- what every handler shows ----------------------------------------------------------------------

    def _background(self, view: SessionView) -> PIL.Image.Image:
        if view.coarse_image is not None:
            return view.coarse_image
        layout = view.layout
        size = (layout.width, layout.height) if layout is not None else (self.width, self.height)
        return PIL.Image.new("RGB", size, (128, 128, 128))

    def _files(self, view: SessionView) -> list[str]:
        folder = self.files_folder / uuid.uuid4().hex
        folder.mkdir(parents=True)
        paths = []
        if view.layout is not None:
            (folder / "layout.json").write_text(layout_to_json(view.layout))
            paths.append(str(folder / "layout.json"))
        for name, image in (("coarse.png", view.coarse_image), ("final.png", view.final_image)):
            if image is not None:
                image.save(folder / name)
                paths.append(str(folder / name))
        return paths

    def render(self, view: SessionView) -> tuple:
        """Outputs for ``views``: state, annotated coarse image, region table, region choices, results, files."""
        layout = view.layout
        background = enlarged(self._background(view), self.scale)
        annotations = []
        choices = []
        if layout is not None:
            for position, region in enumerate(layout.regions):
                mask = np.kron(region.mask, np.ones((self.scale, self.scale), dtype=bool))
                annotations.append((mask.astype(np.float32), region_label(position, region)))
                choices.append((region_label(position, region), position + 1))
        return (
            view,
            (background, annotations),
            regions_markdown(layout),
            gr.update(choices=choices, value=choices[0][1] if choices else None),
            enlarged(view.coarse_image, self.scale) if view.coarse_image is not None else None,
            enlarged(view.final_image, self.scale) if view.final_image is not None else None,
            view.verdicts,
            self._files(view),
            view.status,
        )

    def editor_value(self, view: SessionView) -> dict:
        """The drawing canvas: the coarse image enlarged, no strokes."""
        return {"background": enlarged(self._background(view), self.scale), "layers": [], "composite": None}

    @staticmethod
    def _with_settings(layout: AppLayout, settings: tuple) -> AppLayout:
        return dataclasses.replace(layout, realign=check_realign_settings(*settings))

    # -- handlers -----------------------------------------------------------------------------------

    # The pipeline's progress bars show in the page (gr.Progress(track_tqdm=True)); gradio finds the tracker
    # only as a positional parameter, hence the settings spelled out in draft and realign.
    def draft(
        self,
        prompt,
        seed,
        steps,
        guidance,
        coarse_stop,
        fraction,
        cross,
        self_,
        area,
        progress=gr.Progress(track_tqdm=True),
    ):
        settings = check_draft_settings(prompt, seed, steps, guidance, coarse_stop)
        realign = check_realign_settings(fraction, cross, self_, area)
        progress(0, desc="waiting for the pipeline")
        draft = self.engine.draft(settings)
        dropped = f" Dropped: {'; '.join(draft.dropped)}." if draft.dropped else ""
        view = SessionView(
            layout=dataclasses.replace(draft.layout, realign=realign),
            coarse_image=draft.coarse_image,
            status=f"Drafted {settings.prompt!r} (seed {settings.seed}, {settings.num_inference_steps} steps): "
            f"{len(draft.layout.regions)} region(s) proposed.{dropped}",
        )
        return (*self.render(view), self.editor_value(view))

    def rename(self, view, index, caption, *settings):
        layout = self._with_settings(_require_layout(view), settings)
        text = caption.strip() if isinstance(caption, str) else caption
        layout = rename_region(layout, index, text)
        self.engine.check_caption(layout.draft.prompt, text)  # the pipeline's own check of the caption's words
        return self.render(dataclasses.replace(view, layout=layout, status=f"Region {index} is now {text!r}."))

    def delete(self, view, index, *settings):
        layout = delete_region(self._with_settings(_require_layout(view), settings), index)
        return self.render(dataclasses.replace(view, layout=layout, status=f"Deleted region {index}."))

    def add_box(self, view, caption, x0, y0, x1, y1, *settings):
        layout = self._with_settings(_require_layout(view), settings)
        mask = box_mask(layout.height, layout.width, (x0, y0, x1, y1))
        layout = add_region(layout, caption, mask, "box")
        self.engine.check_caption(layout.draft.prompt, layout.regions[-1].caption)
        status = f"Added region {len(layout.regions)} {layout.regions[-1].caption!r} (box)."
        return self.render(dataclasses.replace(view, layout=layout, status=status))

    def add_drawn(self, view, caption, editor, *settings):
        layout = self._with_settings(_require_layout(view), settings)
        painted = painted_mask((editor or {}).get("layers"))
        layout = add_region(layout, caption, resized_mask(painted, layout.height, layout.width), "drawn")
        self.engine.check_caption(layout.draft.prompt, layout.regions[-1].caption)
        view = dataclasses.replace(
            view, layout=layout, status=f"Added region {len(layout.regions)} {layout.regions[-1].caption!r} (drawn)."
        )
        return (*self.render(view), self.editor_value(view))

    def realign(self, view, fraction, cross, self_, area, progress=gr.Progress(track_tqdm=True)):
        layout = self._with_settings(_require_layout(view), (fraction, cross, self_, area))
        progress(0, desc="waiting for the pipeline")
        result = self.engine.realign(layout)
        verdicts = ""
        if self.engine.judge_prompts:
            lines = [
                f"- **{name}**: {self.engine.verdict(image, layout.draft.prompt)}"
                for name, image in (("coarse", view.coarse_image), ("final", result.final_image))
                if image is not None
            ]
            verdicts = "**Judge** (shapes world, rule-based):\n" + "\n".join(lines)
        dropped = f" Dropped: {'; '.join(result.dropped)}." if result.dropped else ""
        view = dataclasses.replace(
            view,
            layout=layout,
            final_image=result.final_image,
            verdicts=verdicts,
            status=f"Realigned with {len(layout.regions)} region(s) from the draft's noise.{dropped}",
        )
        return self.render(view)

    def upload(self, view, file):
        if file is None:
            raise ValueError("no file was uploaded.")
        path = file if isinstance(file, str) else getattr(file, "name", file)
        layout = layout_from_json(Path(path).read_bytes())
        if (layout.height, layout.width) != (self.height, self.width):
            raise ValueError(
                f"the layout is for {layout.width}x{layout.height} images; the model draws {self.width}x{self.height}."
            )
        view = SessionView(
            layout=layout,
            status=f"Restored a layout of {len(layout.regions)} region(s) for "
            f"{layout.draft.prompt!r}; press Realign (or Draft to see its coarse image).",
        )
        draft, realign = layout.draft, layout.realign
        fields = (
            draft.prompt,
            draft.seed,
            draft.num_inference_steps,
            draft.guidance_scale,
            draft.coarse_stop_fraction,
            *dataclasses.astuple(realign),
        )
        return (*self.render(view), self.editor_value(view), *fields)


def build_app(engine: AppEngine, default_prompt: str, files_folder: str | Path | None = None) -> gr.Blocks:
    """The page for ``engine``. Files offered for download are written under ``files_folder`` (by default a
    new temporary folder, which the caller removes; ``realign app`` removes its own when the server stops).
    Gradio's copies of them, in its cache, are deleted once an hour when older than an hour."""
    page = Page(engine, Path(files_folder or tempfile.mkdtemp(prefix="realign-app-")))
    height, width = page.height, page.width
    defaults = RealignSettings()
    with gr.Blocks(title="RealignDiff", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        view_state = gr.State(None)
        gr.Markdown(
            "## RealignDiff: draft, correct the regions, realign\n"
            "**Draft** runs the coarse pass and proposes one region per object (caption, mask, source). Rename, "
            "delete or add regions, then **Realign** runs the fine pass from the same noise with your layout."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=default_prompt, scale=4, elem_id="prompt")
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
            steps = gr.Number(label="Steps", value=25, precision=0, minimum=1, elem_id="steps")
            guidance = gr.Number(
                label="Guidance scale", value=4.0 if engine.judge_prompts else 7.5, elem_id="guidance"
            )
            coarse_stop = gr.Slider(
                0.05, 1.0, value=1.0, step=0.05, label="Coarse pass stops at", elem_id="coarse-stop"
            )
            draft_button = gr.Button("Draft", variant="primary", elem_id="draft")
        with gr.Row():
            with gr.Column():
                regions_view = gr.AnnotatedImage(label="Coarse image and regions", elem_id="regions-view")
                regions_table = gr.Markdown(regions_markdown(None), elem_id="regions-table")
                status = gr.Markdown(elem_id="status")
            with gr.Column():
                with gr.Group():
                    region_pick = gr.Dropdown(label="Region", choices=[], elem_id="region-pick")
                    with gr.Row():
                        new_caption = gr.Textbox(label="Caption", elem_id="rename-caption", scale=3)
                        rename_button = gr.Button("Rename", elem_id="rename")
                        delete_button = gr.Button("Delete", variant="stop", elem_id="delete")
                with gr.Group():
                    add_caption = gr.Textbox(label="New region's caption", elem_id="add-caption")
                    with gr.Row():
                        box = [
                            gr.Number(
                                label=f"{name} (px of {width}x{height})",
                                value=value,
                                precision=0,
                                elem_id=f"box-{name}",
                            )
                            for name, value in (("x0", 0), ("y0", 0), ("x1", width // 2), ("y1", height // 2))
                        ]
                    add_box_button = gr.Button("Add box region", elem_id="add-box")
                    editor = gr.ImageEditor(
                        label="Or paint the new region's mask",
                        type="numpy",
                        image_mode="RGBA",
                        sources=(),
                        transforms=(),
                        layers=False,
                        brush=gr.Brush(colors=["#ff3030"], color_mode="fixed", default_size=max(4, 3 * page.scale)),
                        canvas_size=(width * page.scale, height * page.scale),
                        fixed_canvas=True,
                        elem_id="editor",
                    )
                    add_drawn_button = gr.Button("Add drawn region", elem_id="add-drawn")
                with gr.Accordion("Re-weighting (fine pass)", open=True):
                    settings = [
                        gr.Slider(
                            0.0,
                            1.0,
                            value=defaults.modulation_fraction,
                            step=0.05,
                            label="Modulated fraction of the steps",
                            elem_id="modulation-fraction",
                        ),
                        gr.Slider(
                            0.0,
                            2.0,
                            value=defaults.cross_attention_weight,
                            step=0.05,
                            label="Cross-attention weight",
                            info="above 1 the early steps invert the order of the scores (the pipeline warns)",
                            elem_id="cross-weight",
                        ),
                        gr.Slider(
                            0.0,
                            2.0,
                            value=defaults.self_attention_weight,
                            step=0.05,
                            label="Self-attention weight",
                            elem_id="self-weight",
                        ),
                        gr.Slider(
                            0.0, 2.0, value=defaults.area_weight, step=0.05, label="Area weight", elem_id="area-weight"
                        ),
                    ]
                realign_button = gr.Button("Realign", variant="primary", elem_id="realign")
        with gr.Row():
            coarse_result = gr.Image(label="Coarse", type="pil", interactive=False, elem_id="coarse-result")
            final_result = gr.Image(label="Final", type="pil", interactive=False, elem_id="final-result")
            with gr.Column():
                verdicts = gr.Markdown(elem_id="verdicts")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                upload = gr.UploadButton("Upload a layout file", file_types=[".json"], elem_id="upload")

        views = [
            view_state,
            regions_view,
            regions_table,
            region_pick,
            coarse_result,
            final_result,
            verdicts,
            downloads,
            status,
        ]
        draft_fields = [prompt, seed, steps, guidance, coarse_stop]
        status_position = views.index(status)

        def on_click(trigger, handler, inputs, outputs) -> None:
            trigger(_page_errors(handler, len(outputs), status_position), inputs, outputs)

        on_click(draft_button.click, page.draft, draft_fields + settings, views + [editor])
        on_click(rename_button.click, page.rename, [view_state, region_pick, new_caption] + settings, views)
        on_click(delete_button.click, page.delete, [view_state, region_pick] + settings, views)
        on_click(add_box_button.click, page.add_box, [view_state, add_caption, *box] + settings, views)
        drawn_inputs = [view_state, add_caption, editor] + settings
        on_click(add_drawn_button.click, page.add_drawn, drawn_inputs, views + [editor])
        on_click(realign_button.click, page.realign, [view_state] + settings, views)
        on_click(upload.upload, page.upload, [view_state, upload], views + [editor] + draft_fields + settings)
    return demo


def launch(demo: gr.Blocks, host: str, port: int, block: bool) -> None:
    """Serve ``demo`` on ``host:port``; with ``block=False`` return once it answers (tests, notebooks)."""
    # System fonts only: the page works offline.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo.queue().launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=False,
        quiet=False,
        ssr_mode=False,
        theme=theme,
    )
