"""Generate and score a T2I-CompBench run, resumably, on one process's shard.

Layout of an output folder:

    manifest.json                                        settings, versions, scheduler, seeds rule
    images/{configuration}/{category}/samples/{prompt}_{index:06d}.png
    scores/{configuration}/{category}/{prompt index:04d}.json   one file per work item
    scores.json, table.md, report.html                   written by process 0 once every shard is done

An image or a score file is written to a temporary name and renamed, so a killed run leaves only whole files;
the same command restarted skips every image and score file that exists. Images are drawn in chunks of at
most ``batch_size`` images of one prompt, at fixed positions, so an image comes out of the same batch whatever
the sharding or the point where a run was killed; scores are always computed from the PNG files on disk.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm

from .configurations import ALL_CONFIGURATIONS, CompBenchConfiguration
from .plan import WorkItem, initial_latents

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class CompBenchSettings:
    """Everything that decides a run's images and scores (the manifest checks a restarted run against it)."""

    model: str
    categories: tuple[str, ...]
    configurations: tuple[str, ...]
    realign_unet: str | None = None
    realign_unet_subfolder: str | None = "unet"
    split: str = "val"
    prompts_per_category: int | None = None
    images_per_prompt: int = 10
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    seed: int = 0
    batch_size: int = 10
    height: int | None = None
    width: int | None = None
    coarse_stop_fraction: float = 0.3
    dtype: str = "float32"
    phrase_parser: str = "spacy"
    vqa_model: str = "Salesforce/blip-vqa-capfilt-large"
    clip_model: str = "openai/clip-vit-base-patch32"
    detector_model: str = "IDEA-Research/grounding-dino-tiny"
    segmenter_model: str = "facebook/sam-vit-base"
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    extra: dict = field(default_factory=dict)


def configuration_by_name(name: str) -> CompBenchConfiguration:
    return next(c for c in ALL_CONFIGURATIONS if c.name == name)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("realign-pipeline", "torch", "diffusers", "transformers", "accelerate", "numpy", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary path)`` and a rename, so it exists only whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    write(temporary)
    os.replace(temporary, path)


def remove_partial_files(output: Path) -> list[Path]:
    """Delete the half-written files a killed run left (``write_atomically``'s temporary names).

    Call it on one process before any process writes: a live writer's temporary file looks the same.
    """
    leftovers = sorted(output.rglob(".*.partial")) if output.is_dir() else []
    for path in leftovers:
        path.unlink()
    return leftovers


def check_manifest(output: Path, settings: CompBenchSettings) -> None:
    """Refuse to resume into a folder whose run had other settings (which would mix two runs' images)."""
    path = output / MANIFEST_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text())["settings"]
    current = json.loads(json.dumps(asdict(settings)))
    differing = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
    if differing:
        details = ", ".join(f"{key}: {previous.get(key)!r} there, {current.get(key)!r} now" for key in differing)
        raise ValueError(
            f"{output} holds a run with other settings ({details}); resume with the same settings or "
            "choose another output folder"
        )


def image_paths(output: Path, item: WorkItem) -> list[Path]:
    folder = output / "images" / item.configuration / item.category / "samples"
    return [folder / name for name in item.file_names]


def score_path(output: Path, item: WorkItem) -> Path:
    return output / "scores" / f"{item.key}.json"


def chunks(count: int, size: int) -> list[range]:
    """Image positions ``0 .. count - 1`` in consecutive chunks of at most ``size``."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def generate_images(
    items: Sequence[WorkItem],
    settings: CompBenchSettings,
    output: Path,
    load_pipeline: Callable[[str], object],
    load_grounder: Callable[[str], object],
    device: torch.device | str,
    progress: bool = True,
    description: str = "generate",
) -> int:
    """Draw every missing image of ``items``; returns how many were drawn.

    ``load_pipeline(unet)`` gives the pipeline of ``"base"`` or ``"finetuned"``; ``load_grounder(name)`` the
    grounder of a re-weighting configuration (``None`` for attention masks). Each is loaded only if one of its
    images is missing, once, and the items are visited UNet by UNet so one pipeline is held at a time.
    """
    missing = {item: [k for k, path in enumerate(image_paths(output, item)) if not path.is_file()] for item in items}
    todo = [item for item in items if missing[item]]
    drawn = 0
    with tqdm(
        total=sum(len(m) for m in missing.values()), desc=description, unit="image", disable=not progress
    ) as bar:
        for unet in ("base", "finetuned"):
            mine = [item for item in todo if configuration_by_name(item.configuration).unet == unet]
            if not mine:
                continue
            pipe = load_pipeline(unet)
            grounders: dict[str, object] = {}
            channels = pipe.unet.config.in_channels
            height = settings.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
            width = settings.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
            shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            for item in mine:
                configuration = configuration_by_name(item.configuration)
                if configuration.grounder is not None and configuration.grounder not in grounders:
                    grounders[configuration.grounder] = load_grounder(configuration.grounder)
                paths, seeds = image_paths(output, item), item.seeds
                for chunk in chunks(item.images_per_prompt, settings.batch_size):
                    if all(paths[k].is_file() for k in chunk):
                        continue
                    latents = torch.stack([initial_latents(seeds[k], shape) for k in chunk])
                    count = len(chunk)
                    negative = None if settings.negative_prompt is None else [settings.negative_prompt] * count
                    result = pipe(
                        [item.prompt] * count,
                        negative_prompt=negative,
                        height=height,
                        width=width,
                        latents=latents.to(device=device, dtype=pipe.unet.dtype),
                        num_inference_steps=settings.num_inference_steps,
                        guidance_scale=settings.guidance_scale,
                        generator=torch.Generator().manual_seed(seeds[chunk[0]]),
                        realign=configuration.realign,
                        grounder=grounders.get(configuration.grounder),
                        coarse_stop_fraction=settings.coarse_stop_fraction,
                    )
                    for k, image in zip(chunk, result.images):
                        if not paths[k].is_file():
                            write_atomically(paths[k], lambda path, image=image: image.save(path, format="PNG"))
                            drawn += 1
                            bar.update(1)
            del pipe, grounders
    return drawn


def score_items(
    items: Sequence[WorkItem],
    output: Path,
    scorer_for: Callable[[str], Callable[[list[PIL.Image.Image], str], list[dict]]],
    progress: bool = True,
    description: str = "score",
) -> int:
    """Score every item without a score file, from its PNG files; returns how many items were scored.

    ``scorer_for(category)`` gives the category's scorer (built on first use by the caller).
    """
    todo = [item for item in items if not score_path(output, item).is_file()]
    for item in tqdm(todo, desc=description, unit="prompt", disable=not progress):
        paths = image_paths(output, item)
        absent = [str(path) for path in paths if not path.is_file()]
        if absent:
            raise FileNotFoundError(f"cannot score {item.key}: images missing: {absent}")
        images = []
        for path in paths:
            with PIL.Image.open(path) as image:
                images.append(image.convert("RGB"))
        results = scorer_for(item.category)(images, item.prompt)
        record = {
            "configuration": item.configuration,
            "category": item.category,
            "prompt_index": item.prompt_index,
            "prompt": item.prompt,
            "images": [
                {"file": path.name, "seed": seed, "score": result["score"], "details": result["details"]}
                for path, seed, result in zip(paths, item.seeds, results)
            ],
        }
        text = json.dumps(record, indent=1) + "\n"
        write_atomically(score_path(output, item), lambda path, text=text: path.write_text(text))
    return len(todo)


def read_scores(items: Sequence[WorkItem], output: Path) -> list[dict]:
    """Every item's score record, in the items' order; a missing file is an error naming it."""
    missing = [str(score_path(output, item)) for item in items if not score_path(output, item).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} score file(s) missing, e.g. {missing[:3]}")
    return [json.loads(score_path(output, item).read_text()) for item in items]
