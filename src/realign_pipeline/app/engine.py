"""The app's one pipeline, shared by every browser session: the draft (coarse pass), the fine pass from a
given layout, the caption check and, on the shapes world, the judge.

``RealignDiffPipeline`` installs its attention processors once and passes each call's re-weighting in that
call's own state, so sessions never share a layout; but a call also sets the scheduler's timesteps and the
pipeline's guidance and interrupt flags, so calls are serialised by one lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch

from ..pipeline_realign_diff import RealignDiffPipeline
from .session import AppLayout, DraftSettings, EditableRegion


@dataclass
class Draft:
    """What a draft gives: the coarse image, the proposed layout, and the captions the pipeline dropped (why)."""

    coarse_image: PIL.Image.Image
    layout: AppLayout
    dropped: list[str]


@dataclass
class Realigned:
    """What the fine pass gives: the final image and the regions the pipeline dropped (why)."""

    final_image: PIL.Image.Image
    dropped: list[str]


def stop_after_first_fine_step(
    pipe: RealignDiffPipeline, step: int, timestep: Any, callback_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``callback_on_step_end`` for a draft: it runs in the fine pass only, so interrupting there (diffusers'
    ``pipe._interrupt``) keeps the whole coarse pass and its layout and skips all but one fine step."""
    pipe._interrupt = True
    return callback_kwargs


class AppEngine:
    """The pipeline behind the page. ``judge_prompts``: judge images with the shapes world's judge."""

    def __init__(self, pipe: RealignDiffPipeline, judge_prompts: bool = False) -> None:
        self.pipe = pipe
        self.judge_prompts = judge_prompts
        self._lock = threading.Lock()

    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images the pipeline draws by default (the UNet's sample size)."""
        sample_size = self.pipe.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * self.pipe.vae_scale_factor, width * self.pipe.vae_scale_factor

    @staticmethod
    def _generator(seed: int) -> torch.Generator:
        # On the CPU whatever the pipeline's device: the draft and the fine pass draw the same initial latents.
        return torch.Generator("cpu").manual_seed(seed)

    def draft(self, settings: DraftSettings) -> Draft:
        """The coarse pass: its image and the layout the pipeline's captioner and grounder propose for it."""
        with self._lock:
            output = self.pipe(
                settings.prompt,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=self._generator(settings.seed),
                coarse_stop_fraction=settings.coarse_stop_fraction,
                callback_on_step_end=stop_after_first_fine_step,
            )
        layout = output.layouts[0]
        height, width = self.image_size()
        regions = tuple(EditableRegion(r.caption, r.mask.numpy().astype(bool), r.source) for r in layout.regions)
        return Draft(
            coarse_image=output.coarse_images[0],
            layout=AppLayout(draft=settings, height=height, width=width, regions=regions),
            dropped=[f"{d.caption!r}: {d.reason}" for d in layout.dropped],
        )

    def realign(self, layout: AppLayout) -> Realigned:
        """The fine pass with ``layout``'s regions, from the draft's initial noise (same seed, steps, guidance)."""
        draft, settings = layout.draft, layout.realign
        with self._lock:
            output = self.pipe(
                draft.prompt,
                height=layout.height,
                width=layout.width,
                num_inference_steps=draft.num_inference_steps,
                guidance_scale=draft.guidance_scale,
                generator=self._generator(draft.seed),
                regions=[(region.caption, region.mask) for region in layout.regions],
                modulation_fraction=settings.modulation_fraction,
                cross_attention_weight=settings.cross_attention_weight,
                self_attention_weight=settings.self_attention_weight,
                area_weight=settings.area_weight,
            )
        return Realigned(output.images[0], [f"{d.caption!r}: {d.reason}" for d in output.layouts[0].dropped])

    def check_caption(self, prompt: str, caption: str) -> None:
        """Raise the pipeline's own ``ValueError`` when ``caption`` cannot be placed among ``prompt``'s words."""
        with self._lock:
            self.pipe.build_layout(prompt, [caption], [torch.ones(1, 1, dtype=torch.bool)], ["check"], strict=True)

    def verdict(self, image: PIL.Image.Image, prompt: str) -> str | None:
        """The shapes world's judge on ``image`` (``None`` on other models): PASS or fail, with its reasons."""
        if not self.judge_prompts:
            return None
        from ..shapes import judge

        try:
            result = judge(image, prompt)
        except ValueError as error:  # not a shapes-world prompt: the judge cannot read it
            return f"not judged: {error}"
        return f"{'PASS' if result.passed else 'fail'} ({'; '.join(result.reasons) or 'all checks hold'})"
