"""Rewards for training tests, referenced from configs as "<this file>:Name"."""

import json
import os
import time
from pathlib import Path

import torch


class Brightness:
    """Mean pixel value: differentiable, and any model can raise it."""

    differentiable = True

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def __call__(self, images, prompts, **context):
        if self.delay:
            time.sleep(self.delay)  # makes steps slow enough to kill a run mid-way
        return images.float().mean(dim=(1, 2, 3)), {}


class Redness:
    """Red minus the other channels: a second, non-differentiable criterion for ranking."""

    differentiable = False

    def __call__(self, images, prompts, **context):
        return (images[:, 0] - images[:, 1:].mean(1)).float().mean(dim=(1, 2)), {}


class RecordingBrightness(Brightness):
    """Brightness that appends the prompts of each call to prompts-<rank>.jsonl in log_dir."""

    def __init__(self, log_dir: str, delay: float = 0.0):
        super().__init__(delay)
        self.log_dir = Path(log_dir)

    def __call__(self, images, prompts, **context):
        rank = os.environ.get("RANK", "0")
        with open(self.log_dir / f"prompts-{rank}.jsonl", "a") as log:
            log.write(json.dumps({"grad": torch.is_grad_enabled(), "prompts": list(prompts)}) + "\n")
        return super().__call__(images, prompts, **context)


class ScriptedValidation:
    """Scores validation prompts from a script (one value per validation call, in order) and
    training samples by brightness: lets a test decide which round is best."""

    differentiable = False

    def __init__(self, validation_prompts: list[str], script: list[float]):
        self.validation_prompts = set(validation_prompts)
        self.script = list(script)
        self.calls = 0

    def __call__(self, images, prompts, **context):
        if set(prompts) <= self.validation_prompts:
            value = self.script[self.calls]
            self.calls += 1
            return torch.full((len(prompts),), float(value)), {}
        return images.float().mean(dim=(1, 2, 3)), {}


class KeyedBrightness(Brightness):
    """Brightness with credentials among its options, as an LLM-backed reward would have."""

    def __init__(self, api_key: str, llm: dict, delay: float = 0.0):
        super().__init__(delay)
        self.api_key, self.llm = api_key, llm
