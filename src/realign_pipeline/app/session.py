"""One browser session's layout: the draft's settings, its regions, the fine pass's settings, and edits of them.

Pure data and functions, no model and no gradio: the page (``ui.py``) keeps one ``AppLayout`` per browser
session in a ``gr.State`` and replaces it with the value an edit returns, so an edit that raises leaves the
previous layout in place. The layout file (``layout_to_json`` / ``layout_from_json``) holds everything a fine
pass needs: prompt, seed, steps, guidance, the regions' captions and masks (PNG, base64) and the re-weighting
settings, so uploading it restores the layout and realigning it draws the same image again.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

LAYOUT_FORMAT = "realign-app-layout"
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class DraftSettings:
    """What the coarse pass (the draft) ran with; the fine pass reuses them so it starts from the same noise."""

    prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    coarse_stop_fraction: float


@dataclass(frozen=True)
class RealignSettings:
    """The fine pass's re-weighting (``RealignDiffPipeline.__call__``'s arguments, DenseDiffusion's defaults)."""

    modulation_fraction: float = 0.3
    cross_attention_weight: float = 1.0
    self_attention_weight: float = 0.3
    area_weight: float = 1.0


@dataclass(frozen=True, eq=False)
class EditableRegion:
    """One region of the layout: its caption, its bool (height, width) mask and where the mask came from
    (the grounder's name, ``"attention"``, ``"box"``, ``"drawn"``)."""

    caption: str
    mask: np.ndarray
    source: str


@dataclass(frozen=True)
class AppLayout:
    """A session's layout: the draft's settings, the image size, the regions and the fine pass's settings."""

    draft: DraftSettings
    height: int
    width: int
    regions: tuple[EditableRegion, ...]
    realign: RealignSettings = RealignSettings()


def _finite(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return number


def _integer(value: Any, name: str, minimum: int) -> int:
    number = _finite(value, name)
    if number != int(number) or number < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(number)


def _fraction(value: Any, name: str, allow_zero: bool) -> float:
    number = _finite(value, name)
    low_ok = number >= 0 if allow_zero else number > 0
    if not (low_ok and number <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")
    return number


def check_draft_settings(
    prompt: Any, seed: Any, num_inference_steps: Any, guidance_scale: Any, coarse_stop_fraction: Any
) -> DraftSettings:
    """The draft's settings from the page's fields, or a ``ValueError`` naming the field and what it must be."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("`prompt` must be a non-empty text.")
    guidance = _finite(guidance_scale, "guidance_scale")
    if guidance < 0:
        raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale!r}.")
    return DraftSettings(
        prompt=prompt.strip(),
        seed=_integer(seed, "seed", 0),
        num_inference_steps=_integer(num_inference_steps, "num_inference_steps", 1),
        guidance_scale=guidance,
        coarse_stop_fraction=_fraction(coarse_stop_fraction, "coarse_stop_fraction", allow_zero=False),
    )


def check_realign_settings(
    modulation_fraction: Any, cross_attention_weight: Any, self_attention_weight: Any, area_weight: Any
) -> RealignSettings:
    """The fine pass's settings from the page's fields, or a ``ValueError`` naming the field."""
    weights = {}
    for name, value in (
        ("cross_attention_weight", cross_attention_weight),
        ("self_attention_weight", self_attention_weight),
        ("area_weight", area_weight),
    ):
        weights[name] = _finite(value, name)
        if weights[name] < 0:
            raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
    return RealignSettings(
        modulation_fraction=_fraction(modulation_fraction, "modulation_fraction", allow_zero=True), **weights
    )


def _region_index(layout: AppLayout, index: Any) -> int:
    if not layout.regions:
        raise ValueError("the layout has no regions; draft first, or add one.")
    number = _integer(index, "region", 1) if index is not None else None
    if number is None or number > len(layout.regions):
        raise ValueError(f"`region` must be a region number from 1 to {len(layout.regions)}, got {index!r}.")
    return number - 1


def _checked_caption(layout: AppLayout, caption: Any, ignore: int | None = None) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("`caption` must be a non-empty text.")
    text = caption.strip()
    for position, region in enumerate(layout.regions):
        if position != ignore and region.caption == text:
            raise ValueError(
                f"`caption`: region {position + 1} already has the caption {text!r}; give each object one region."
            )
    return text


def rename_region(layout: AppLayout, index: Any, caption: Any) -> AppLayout:
    """The layout with region ``index`` (1-based) renamed. Whether the caption's words are in the prompt is the
    pipeline's check (``RealignDiffPipeline.build_layout``); the page runs it before calling this."""
    position = _region_index(layout, index)
    text = _checked_caption(layout, caption, ignore=position)
    regions = list(layout.regions)
    regions[position] = dataclasses.replace(regions[position], caption=text)
    return dataclasses.replace(layout, regions=tuple(regions))


def delete_region(layout: AppLayout, index: Any) -> AppLayout:
    """The layout without region ``index`` (1-based)."""
    position = _region_index(layout, index)
    return dataclasses.replace(layout, regions=layout.regions[:position] + layout.regions[position + 1 :])


def add_region(layout: AppLayout, caption: Any, mask: np.ndarray, source: str) -> AppLayout:
    """The layout with one more region; ``mask`` is a bool (height, width) array that must not be empty."""
    text = _checked_caption(layout, caption)
    mask = np.asarray(mask)
    if mask.shape != (layout.height, layout.width) or mask.dtype != np.bool_:
        raise ValueError(
            f"`mask` must be a bool array of the image's size {(layout.height, layout.width)}, "
            f"got {mask.dtype} {mask.shape}."
        )
    if not mask.any():
        raise ValueError("`mask` is empty: draw or give a box over at least one pixel.")
    return dataclasses.replace(layout, regions=layout.regions + (EditableRegion(text, mask.copy(), source),))


def box_mask(height: int, width: int, box: tuple[Any, Any, Any, Any]) -> np.ndarray:
    """A bool (height, width) mask that is True inside ``box`` = (x0, y0, x1, y1) in pixels, ends exclusive."""
    x0, y0, x1, y1 = (_integer(value, name, 0) for value, name in zip(box, ("x0", "y0", "x1", "y1")))
    if not (x0 < x1 <= width and y0 < y1 <= height):
        raise ValueError(
            f"the box (x0, y0, x1, y1) must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}, "
            f"got {(x0, y0, x1, y1)}."
        )
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def painted_mask(layers: Any) -> np.ndarray:
    """The pixels painted on any layer of a ``gr.ImageEditor`` value (RGBA arrays): alpha above zero."""
    if not layers:
        raise ValueError("nothing is drawn: paint the region on the image first.")
    painted = None
    for layer in layers:
        array = np.asarray(layer)
        if array.ndim != 3 or array.shape[-1] != 4:
            raise ValueError(f"a drawn layer must be an RGBA image, got shape {array.shape}.")
        alpha = array[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if not painted.any():
        raise ValueError("nothing is drawn: paint the region on the image first.")
    return painted


def resized_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``mask`` at (height, width): the share of each output pixel that is painted, cut at 0.5 (area average)."""
    image = PIL.Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.resize((width, height), PIL.Image.Resampling.BOX)) >= 128


def region_label(position: int, region: EditableRegion) -> str:
    """How the page names a region: its 1-based number, caption and source."""
    return f"{position + 1}: {region.caption} ({region.source})"


def regions_markdown(layout: AppLayout | None) -> str:
    """The regions as a Markdown table: number, caption, mask source and the share of the image it covers."""
    if layout is None:
        return "No layout yet: press **Draft**, or upload a layout file."
    if not layout.regions:
        return "No regions: the fine pass runs without re-weighting. Add one with a box or by drawing."
    rows = ["| # | caption | source | area |", "|---|---|---|---|"]
    for position, region in enumerate(layout.regions):
        caption = region.caption.replace("\\", "\\\\").replace("|", "\\|")  # shown as typed, in one cell
        rows.append(f"| {position + 1} | {caption} | {region.source} | {100 * region.mask.mean():.1f}% |")
    return "\n".join(rows)


def _mask_to_png(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mask_from_png(text: Any, height: int, width: int, name: str) -> np.ndarray:
    try:
        image = PIL.Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
    except Exception as error:  # binascii.Error, PIL.UnidentifiedImageError, ...: all mean "not a PNG in base64"
        raise ValueError(f"`{name}` must be a base64-encoded PNG mask ({error}).") from None
    mask = np.asarray(image.convert("L")) >= 128
    if mask.shape != (height, width):
        raise ValueError(f"`{name}` is {mask.shape[1]}x{mask.shape[0]} pixels; the layout is {width}x{height}.")
    return mask


def layout_to_json(layout: AppLayout) -> str:
    """The layout file: settings, regions (caption, source, mask as a base64 PNG, 255 inside) and image size."""
    record = {
        "format": LAYOUT_FORMAT,
        "version": LAYOUT_VERSION,
        **dataclasses.asdict(layout.draft),
        "height": layout.height,
        "width": layout.width,
        "realign": dataclasses.asdict(layout.realign),
        "regions": [
            {"caption": r.caption, "source": r.source, "mask_png": _mask_to_png(r.mask)} for r in layout.regions
        ],
    }
    return json.dumps(record, indent=2)


def layout_from_json(text: str | bytes) -> AppLayout:
    """Read a layout file written by ``layout_to_json``; a ``ValueError`` names the first field that is wrong."""
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"the layout file is not JSON: {error}.") from None
    if not isinstance(record, dict) or record.get("format") != LAYOUT_FORMAT:
        raise ValueError(f'the layout file must be a JSON object with "format": "{LAYOUT_FORMAT}".')
    if record.get("version") != LAYOUT_VERSION:
        raise ValueError(f"the layout file's `version` must be {LAYOUT_VERSION}, got {record.get('version')!r}.")
    missing = [
        name
        for name in (
            "prompt",
            "seed",
            "num_inference_steps",
            "guidance_scale",
            "coarse_stop_fraction",
            "height",
            "width",
            "realign",
            "regions",
        )
        if name not in record
    ]
    if missing:
        raise ValueError(f"the layout file lacks {', '.join(f'`{name}`' for name in missing)}.")
    draft = check_draft_settings(
        record["prompt"],
        record["seed"],
        record["num_inference_steps"],
        record["guidance_scale"],
        record["coarse_stop_fraction"],
    )
    height, width = _integer(record["height"], "height", 1), _integer(record["width"], "width", 1)
    settings = record["realign"]
    if not isinstance(settings, dict):
        raise ValueError("the layout file's `realign` must be an object of the fine pass's settings.")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(RealignSettings)})
    if unknown:
        raise ValueError(f"the layout file's `realign` has unknown settings {unknown}.")
    defaults = RealignSettings()
    realign = check_realign_settings(
        *(settings.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(RealignSettings))
    )
    if not isinstance(record["regions"], list):
        raise ValueError("the layout file's `regions` must be a list.")
    layout = AppLayout(draft=draft, height=height, width=width, regions=(), realign=realign)
    for position, region in enumerate(record["regions"]):
        name = f"regions[{position}]"
        if not isinstance(region, dict) or not {"caption", "mask_png"} <= set(region):
            raise ValueError(f"`{name}` must be an object with `caption` and `mask_png`.")
        mask = _mask_from_png(region["mask_png"], height, width, f"{name}.mask_png")
        layout = add_region(layout, region["caption"], mask, str(region.get("source", "upload")))
    return layout
