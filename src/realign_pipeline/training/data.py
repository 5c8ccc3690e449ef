"""Prompts and (image, caption) pairs, sharded across processes by step number, not by state."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch


def read_prompts(source: str | Path, split: str = "train", column: str = "prompt") -> list[str]:
    """Prompts from a text file (one per line; blank lines and ``#`` comments skipped) or from a
    Hub dataset named ``hf:<dataset id>`` (needs the ``datasets`` package)."""
    source = str(source)
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as error:
            raise ImportError("Prompts from a Hub dataset need `pip install datasets`.") from error
        dataset = datasets.load_dataset(source[3:], split=split)
        prompts = [str(item).strip() for item in dataset[column]]
    else:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"No prompts in {source}.")
    return prompts


class PromptSampler:
    """Which prompts a process trains on at a given micro-step: a pure function of the step.

    Each epoch is a fresh permutation of the prompts (seeded by ``seed`` and the epoch), cut into
    whole global batches of ``batch_size × num_processes``; process ``p`` takes the ``p``-th slice.
    The last ``len(prompts) mod (batch_size × num_processes)`` prompts of each permutation are left
    out of that epoch (``drop_last``, a different few each epoch): a global batch never straddles
    two epochs, so different processes never share a prompt within a batch, and no prompt repeats
    within one. No iterator state means resuming at step ``s`` sees exactly the prompts an
    uninterrupted run would.
    """

    def __init__(
        self, prompts: Sequence[str], batch_size: int, num_processes: int = 1, process_index: int = 0, seed: int = 0
    ) -> None:
        if batch_size < 1 or num_processes < 1:
            raise ValueError(f"batch_size and num_processes must be ≥ 1, not {batch_size} and {num_processes}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), not {process_index}.")
        global_size = batch_size * num_processes
        if len(prompts) < global_size:
            raise ValueError(
                f"PromptSampler needs at least batch_size × num_processes = {global_size} prompts (one global "
                f"batch without a repeat), not {len(prompts)}: lower train_batch_size or add prompts."
            )
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.batches_per_epoch = len(self.prompts) // global_size
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time; keep memory flat
        return self._orders[epoch]

    def batch(self, micro_step: int) -> list[str]:
        epoch, batch_index = divmod(micro_step, self.batches_per_epoch)
        global_size = self.batch_size * self.num_processes
        first = batch_index * global_size + self.process_index * self.batch_size
        order = self._order(epoch)
        return [self.prompts[order[position]] for position in range(first, first + self.batch_size)]


def step_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``seed`` and ``parts`` (step, process, ...): the randomness of a step is
    fixed by its coordinates, so a resumed run draws what the uninterrupted run drew."""
    mixed = np.random.SeedSequence([seed, *parts]).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(mixed))


@dataclass
class CaptionedImages:
    """(image, caption) pairs for the denoising regulariser, as ``[-1, 1]`` tensors at ``resolution``."""

    images: list[PIL.Image.Image]
    captions: list[str]
    resolution: int

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        tensors = [image_to_tensor(self.images[i], self.resolution) for i in indices]
        return torch.stack(tensors), [self.captions[i] for i in indices]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        indices = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return self.batch(indices)


def image_to_tensor(image: PIL.Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop, scale to ``[-1, 1]`` (diffusers' recipe)."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    resized = image.resize(
        (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
        PIL.Image.Resampling.BILINEAR,
    )
    left, top = (resized.width - resolution) // 2, (resized.height - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def load_captioned_images(
    source: str | Path, resolution: int, image_column: str = "image", caption_column: str = "text"
) -> CaptionedImages:
    """Pairs from a folder with ``metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``, the
    ``imagefolder`` convention of diffusers' training examples) or from ``hf:<dataset id>``."""
    source = str(source)
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as error:
            raise ImportError("Regulariser data from a Hub dataset needs `pip install datasets`.") from error
        dataset = datasets.load_dataset(source[3:], split="train")
        return CaptionedImages(list(dataset[image_column]), [str(t) for t in dataset[caption_column]], resolution)
    folder = Path(source)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{folder / 'metadata.jsonl'} lists no images.")
    images = [PIL.Image.open(folder / record["file_name"]).convert("RGB") for record in records]
    return CaptionedImages(images, [str(record[caption_column]) for record in records], resolution)


def write_captioned_images(folder: str | Path, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> Path:
    """Write pairs as an ``imagefolder`` (PNG files and ``metadata.jsonl``); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        name = f"{index:05d}.png"
        image.save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
