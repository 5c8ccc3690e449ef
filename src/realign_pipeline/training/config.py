"""The one configuration of a caption-reward fine-tuning run, and how to read it from a file."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Limit, check_fields, check_model_source, read_options

# Option names whose values are credentials: api_key, apikey, hf_token, access_token, client_secret,
# password, ... (whole words between underscores, so max_new_tokens and tokenizer are not matched).
SECRET_KEY_PATTERN = re.compile(r"(^|_)(api_?key|token|secret|secret_key|password|passwd)($|_)")
REDACTED = "<redacted>"


def is_secret_key(key: object) -> bool:
    """Whether an option named ``key`` holds a credential (case and ``-``/``_`` insensitive)."""
    return isinstance(key, str) and SECRET_KEY_PATTERN.search(key.lower().replace("-", "_")) is not None


def redact_secrets(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists, tuples) with every credential-named key's value
    replaced by ``"<redacted>"``: what is written to ``training_summary.json``, ``config.json``
    and the trackers' hyperparameters, so an ``api_key`` in a reward's options never lands there."""
    if isinstance(value, Mapping):
        return {key: REDACTED if is_secret_key(key) else redact_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item) for item in value]
    return value


def _default_rewards() -> list[dict[str, Any]]:
    return [{"name": "concept_matching", "model": "Salesforce/blip-image-captioning-base", "weight": 1.0}]


# What each numeric option may be (``options.Limit``); TrainConfig checks them on construction.
TRAIN_LIMITS: dict[str, Limit] = {
    "resolution": Limit(8, multiple_of=8),
    "num_validation_prompts": AT_LEAST_ONE,
    "lora_rank": AT_LEAST_ONE,
    "lora_alpha": POSITIVE,
    "ema_decay": Limit(0, 1, high_open=True),
    "learning_rate": POSITIVE,
    "adam_beta1": Limit(0, 1, high_open=True),
    "adam_beta2": Limit(0, 1, high_open=True),
    "adam_weight_decay": NON_NEGATIVE,
    "adam_epsilon": POSITIVE,
    "max_grad_norm": POSITIVE,
    "lr_warmup_steps": NON_NEGATIVE,
    "train_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "max_train_steps": AT_LEAST_ONE,
    "stop_after_steps": AT_LEAST_ONE,
    "num_inference_steps": AT_LEAST_ONE,
    "refl_step_range": NON_NEGATIVE,
    "guidance_scale": NON_NEGATIVE,
    "reward_loss_weight": NON_NEGATIVE,
    "pretrain_loss_weight": NON_NEGATIVE,
    "pretrain_batch_size": AT_LEAST_ONE,
    "pretrain_generate_count": AT_LEAST_ONE,
    "attribute_concentration_weight": NON_NEGATIVE,
    "ranked_samples_per_prompt": AT_LEAST_ONE,
    "ranked_keep_per_prompt": AT_LEAST_ONE,
    "ranked_rounds": AT_LEAST_ONE,
    "ranked_prompts_per_round": AT_LEAST_ONE,
    "ranked_epochs_per_round": AT_LEAST_ONE,
    "checkpointing_steps": AT_LEAST_ONE,
    "checkpoints_total_limit": AT_LEAST_ONE,
    "validation_steps": NON_NEGATIVE,
}
# diffusers.optimization.SchedulerType's names (written out: importing diffusers costs seconds).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("refl", "reward_ranked"),
    "sampler": ("ddpm", "ddim"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "lr_scheduler": LR_SCHEDULERS,
    "report_to": ("tensorboard", "wandb", "all", "none"),
}


@dataclass
class TrainConfig:
    """Everything a ``realign train`` run needs. Defaults are ReFL's settings (ImageReward, SD 1.4)
    scaled to one GPU; ``method = "reward_ranked"`` switches to FineRewards' / RAFT's loop.

    Read it with ``load_config(path, overrides)``: YAML (``.yaml``/``.yml``), JSON or TOML files
    with these field names as keys.
    """

    # -- what to train, on what ------------------------------------------------------------------
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Base Stable Diffusion 1.x pipeline: a Hub id or a local diffusers folder."""
    revision: str | None = None
    method: str = "refl"
    """``refl`` (reward feedback learning, needs a differentiable reward) or ``reward_ranked``."""
    prompts: str = ""
    """A text file with one prompt per line, or ``hf:<dataset id>`` (uses ``prompt_split``/``prompt_column``)."""
    prompt_split: str = "train"
    prompt_column: str = "prompt"
    validation_prompts: str | None = None
    """Prompt file for validation and the before/after sample grid; default: the first training prompts."""
    num_validation_prompts: int = 4
    rewards: list[dict[str, Any]] = field(default_factory=_default_rewards)
    """Rewards and their weights: ``[{"name": "concept_matching", "weight": 1.0, ...options}]``;
    names: ``concept_matching``, ``caption``, ``tags``, or ``"module:Name"`` / ``"file.py:Name"``."""
    output_dir: str = "outputs/realign-refl"
    seed: int = 0
    resolution: int = 512

    # -- the trained weights -------------------------------------------------------------------
    use_lora: bool = True
    lora_rank: int = 4
    lora_alpha: float | None = None
    """LoRA scale numerator (``alpha / rank`` scales the update); default: equal to the rank."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    mixed_precision: str = "no"
    """``no``, ``fp16`` or ``bf16`` (``accelerate launch --mixed_precision`` overrides it)."""

    # -- optimisation --------------------------------------------------------------------------
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    train_batch_size: int = 1
    """Prompts per process per micro-step."""
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    """Optimizer steps (ReFL); for ``reward_ranked`` the steps are set by rounds and kept samples."""
    stop_after_steps: int | None = None
    """End the run early at this step (after checkpointing), as a time-limited job would; the same
    command without it resumes."""

    # -- ReFL (ImageReward): sampling, the gradient step, the loss -----------------------------
    sampler: str = "ddpm"
    """``ddpm`` (ReFL's) or ``ddim`` (deterministic)."""
    num_inference_steps: int = 40
    refl_step_range: list[int] = field(default_factory=lambda: [30, 40])
    """``[start, end)``: the denoising step (0-based, of ``num_inference_steps``) that takes the gradient
    is drawn uniformly from it; steps before it run without gradient."""
    guidance_scale: float = 7.5
    reward_threshold: float = 0.0
    """``α`` in ``λ·relu(α − r)``: scores above it stop contributing (ImageReward uses 2 for its reward;
    concept matching's log-likelihoods are ≤ 0, so 0 keeps every sample in)."""
    reward_loss_weight: float = 1e-3
    """``λ`` (ImageReward's ``grad_scale``)."""
    pretrain_loss_weight: float = 1.0
    """Weight of the denoising (pretraining) loss on (image, caption) pairs; 0 turns the regulariser off."""
    pretrain_data: str | None = None
    """(image, caption) pairs: a folder with ``metadata.jsonl`` (``file_name``, ``text``), ``hf:<dataset id>``,
    or ``generate`` (images of the base model for the training prompts, made once before training)."""
    pretrain_image_column: str = "image"
    pretrain_caption_column: str = "text"
    pretrain_batch_size: int = 1
    pretrain_generate_count: int = 64
    attribute_concentration_weight: float = 0.0
    """CoMat's attribute-concentration loss weight (1e-3 in CoMat), on the gradient step's cross-attention."""
    attribute_concentration_grounder: dict[str, Any] | None = None
    """Masks for it: ``{"name": "module:Factory", ...options}`` building a ``Grounder`` (Grounded-SAM, as
    CoMat); ``None``: masks cut from the step's own cross-attention maps (no model)."""

    # -- reward-ranked learning (FineRewards, RAFT) --------------------------------------------
    ranked_samples_per_prompt: int = 10
    ranked_keep_per_prompt: int = 1
    ranked_rounds: int = 2
    ranked_prompts_per_round: int | None = None
    """Prompts sampled (per round, all processes together); default: all of them."""
    ranked_epochs_per_round: int = 1

    # -- bookkeeping ---------------------------------------------------------------------------
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = "latest"
    """``latest`` (resume when a checkpoint exists, else start), a checkpoint folder, or ``None``."""
    validation_steps: int = 0
    """Score the validation prompts every this many steps (0: only before and after training)."""
    report_to: str = "tensorboard"
    """``tensorboard``, ``wandb``, ``all`` or ``none``."""
    tracker_project_name: str = "realign-diff"
    save_lora_adapter: bool = True
    """LoRA runs: besides ``unet/`` (the update merged into the weights, loadable as a plain UNet), save
    the adapter alone as ``lora/pytorch_lora_weights.safetensors``."""

    def __post_init__(self) -> None:
        check_fields(self, TRAIN_LIMITS, TRAIN_CHOICES)
        if len(self.refl_step_range) != 2 or (
            self.method == "refl"
            and not 0 <= self.refl_step_range[0] < self.refl_step_range[1] <= self.num_inference_steps
        ):
            raise UsageError(
                f"refl_step_range must be [start, end] with 0 <= start < end <= num_inference_steps "
                f"({self.num_inference_steps}), got {self.refl_step_range}"
            )
        if self.ranked_keep_per_prompt > self.ranked_samples_per_prompt:
            raise UsageError(
                f"ranked_keep_per_prompt must be <= ranked_samples_per_prompt ({self.ranked_samples_per_prompt}), "
                f"got {self.ranked_keep_per_prompt}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_public_dict(self) -> dict[str, Any]:
        """``to_dict()`` with credentials (``api_key``, ``token``, ...) redacted: for files and trackers."""
        return redact_secrets(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, credentials redacted (pass keys through the environment instead)."""
        Path(path).write_text(json.dumps(self.to_public_dict(), indent=2) + "\n")


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] | None = None
) -> TrainConfig:
    """A ``TrainConfig`` from a YAML, JSON or TOML file, with ``overrides`` (``["key=value", ...]`` or a
    mapping) applied on top: ``options.read_options``, whose errors (``UsageError``) name the file.

    Unknown keys are an error, so a typo does not silently fall back to a default.
    """
    return read_options(TrainConfig, path, overrides)


def unknown_keys(options: Mapping[str, Any]) -> list[str]:
    """The keys of ``options`` that are not ``TrainConfig`` fields, sorted (a typo must not pass silently)."""
    return sorted(set(options) - {f.name for f in fields(TrainConfig)})


def config_replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``config`` with ``changes`` (validated again)."""
    return dataclasses.replace(config, **changes)


def check_run_inputs(config: TrainConfig) -> None:
    """What a run reads, checked before any model loads: the rewards' names, a local base model's folder, the
    prompt files (present, with
    at least one prompt), the regulariser's folder and the checkpoint to resume from. ``UsageError`` names the
    option."""
    from ..rewards.factory import check_reward_specs
    from .data import read_prompts

    check_reward_specs(config.rewards)
    check_model_source("pretrained_model", config.pretrained_model, ["model_index.json", "unet/config.json"])
    if not config.prompts:
        raise UsageError("prompts is not set: give a text file with one prompt per line, or hf:<dataset id>")
    for name in ("prompts", "validation_prompts"):
        source = getattr(config, name)
        if source is None or str(source).startswith("hf:"):
            continue
        if not Path(source).is_file():
            raise UsageError(f"{name}: no such file {source!r} (a text file with one prompt per line)")
        try:
            read_prompts(source)
        except ValueError:
            raise UsageError(
                f"{name}: {source!r} holds no prompts (one prompt per line; # starts a comment)"
            ) from None
    data = config.pretrain_data
    if data is not None and data != "generate" and not data.startswith("hf:"):
        if not (Path(data) / "metadata.jsonl").is_file():
            raise UsageError(
                f"pretrain_data: {data!r} is not a folder with metadata.jsonl (or use hf:<dataset id> or generate)"
            )
    resume = config.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise UsageError(
            f"resume_from_checkpoint: no such folder {resume!r} (use latest, null or a checkpoint folder)"
        )
