"""A picture of one RealignDiff call: the coarse image, each mask over it, and the final image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .pipeline_realign_diff import Layout

# Distinct tints for masks, so neighbouring regions read apart.
MASK_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def overlay_mask(
    image: PIL.Image.Image, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.5
) -> PIL.Image.Image:
    """Tint the pixels of ``mask`` (bool, image-sized) with ``colour``; the rest is dimmed."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = pixels * 0.35
    tinted[mask] = (1 - alpha) * pixels[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return PIL.Image.fromarray(tinted.clip(0, 255).astype(np.uint8))


def layout_panel(
    final_image: PIL.Image.Image,
    layout: Layout,
    coarse_image: PIL.Image.Image | None = None,
    tile_size: int = 192,
    caption_lines: Sequence[str] = (),
    labels: tuple[str, str] = ("coarse", "final"),
) -> PIL.Image.Image:
    """One row: coarse image, one tile per region (mask over the coarse image, or over the final
    image when there was no coarse pass), then the final image; captions under each tile.

    ``labels`` name the first and last tile (``("plain", "re-weighted")`` where the first image is the
    same noise drawn without regions rather than a coarse pass)."""
    background = coarse_image if coarse_image is not None else final_image
    tiles: list[tuple[PIL.Image.Image, str]] = []
    if coarse_image is not None:
        tiles.append((coarse_image, labels[0]))
    for index, region in enumerate(layout.regions):
        colour = MASK_COLOURS[index % len(MASK_COLOURS)]
        tiles.append((overlay_mask(background, region.mask.numpy(), colour), f"{region.caption} [{region.source}]"))
    tiles.append((final_image, labels[1]))
    for dropped in layout.dropped:
        caption_lines = [*caption_lines, f"dropped {dropped.caption!r}: {dropped.reason}"]

    font = PIL.ImageFont.load_default()
    label_height = 28
    footer = 14 * (len(caption_lines) + 1)
    panel = PIL.Image.new("RGB", (tile_size * len(tiles), tile_size + label_height + footer), "white")
    draw = PIL.ImageDraw.Draw(panel)
    for column, (tile, label) in enumerate(tiles):
        panel.paste(tile.convert("RGB").resize((tile_size, tile_size), PIL.Image.NEAREST), (column * tile_size, 0))
        draw.text((column * tile_size + 4, tile_size + 4), label[:34], fill="black", font=font)
    draw.text((4, tile_size + label_height), layout.prompt, fill="black", font=font)
    for line_index, line in enumerate(caption_lines, start=1):
        draw.text((4, tile_size + label_height + 14 * line_index), line, fill="dimgray", font=font)
    return panel


def save_layout_panels(
    final_images: Sequence[PIL.Image.Image],
    layouts: Sequence[Layout],
    path: str | Path,
    coarse_images: Sequence[PIL.Image.Image] | None = None,
    notes: Sequence[Sequence[str]] | None = None,
    tile_size: int = 192,
    labels: tuple[str, str] = ("coarse", "final"),
) -> Path:
    """Stack one ``layout_panel`` per image into a single PNG at ``path``; returns the path."""
    if len(final_images) != len(layouts):
        raise ValueError(f"`layouts` has {len(layouts)} entries for {len(final_images)} images")
    rows = [
        layout_panel(
            image,
            layout,
            coarse_images[index] if coarse_images is not None else None,
            tile_size=tile_size,
            caption_lines=notes[index] if notes is not None else (),
            labels=labels,
        )
        for index, (image, layout) in enumerate(zip(final_images, layouts))
    ]
    width = max(row.width for row in rows)
    sheet = PIL.Image.new("RGB", (width, sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
