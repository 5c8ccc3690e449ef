"""Publish a caption-reward fine-tuned UNet to the Hugging Face Hub in one commit (the weights are written by
``training/export.py``; this module builds the repository folder, its model card, and uploads it).

Two kinds of repository:

* a full pipeline folder: the base pipeline's components with the fine-tuned UNet in place,
  ``model_index.json`` naming ``StableDiffusionPipeline`` (plain diffusers loads it) and the
  pipeline file beside it as ``pipeline.py`` (``custom_pipeline=repo, trust_remote_code=True``
  gives a ``RealignDiffPipeline``);
* ``unet_only``: just ``unet/``, for ``RealignDiffPipeline.from_pretrained(base, realign_unet=repo)``.

Either way with a model card (``README.md``) written from the run's ``training_summary.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, ModelCardData

from .errors import UsageError

logger = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"
REPO_TAGS = ["diffusers", "text-to-image", "realign-diff", "stable-diffusion"]
# Written into every folder build_upload_folder makes (never uploaded): a later build may replace such a folder,
# so a dry run's --staging-dir can be pushed with the same command line.
STAGING_MARKER = ".realign-staging"


class HubError(RuntimeError):
    """The Hub could not be reached, or refused a request (authentication, permissions, a bad repo id)."""


# -- the folder to upload --------------------------------------------------------------------------


def is_staging_folder(folder: str | Path) -> bool:
    """Whether ``folder`` was written by ``build_upload_folder`` (it holds the staging marker)."""
    return (Path(folder) / STAGING_MARKER).is_file()


def check_push_inputs(trained: str | Path, base_model: str | None, staging_dir: str | Path | None) -> None:
    """What ``build_upload_folder`` will need, checked before anything is written or uploaded:
    ``UsageError`` naming the argument."""
    trained = Path(trained)
    if not trained.is_dir():
        raise UsageError(f"trained: no such folder {str(trained)!r} (a training output folder or a UNet folder)")
    try:
        unet_folder_of(trained)
    except FileNotFoundError:
        raise UsageError(
            f"trained: {str(trained)!r} holds no diffusers UNet (config.json + safetensors, in it or in unet/)"
        ) from None
    if base_model is None and not read_summary(trained).get("config", {}).get("pretrained_model"):
        raise UsageError(
            f"--base-model is needed: {str(trained)!r} has no training_summary.json naming the base pipeline"
        )
    if staging_dir is not None:
        staging = Path(staging_dir)
        if staging.exists() and not staging.is_dir():
            raise UsageError(f"--staging-dir {staging}: a file is in the way; name a folder")
        if staging.is_dir() and any(staging.iterdir()) and not is_staging_folder(staging):
            raise UsageError(
                f"--staging-dir {staging}: not empty, and not a folder realign push made; everything in it would "
                "be uploaded, so use an empty or new folder"
            )


def public_name(value: Any) -> Any:
    """An absolute local path as its last part (a model card must not show the trainer's file system)."""
    if isinstance(value, str) and value and Path(value).is_absolute():
        return Path(value).name
    return value


def read_summary(trained: str | Path) -> dict[str, Any]:
    path = Path(trained) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def unet_folder_of(trained: str | Path) -> Path:
    """``trained`` is a training output folder (with ``unet/``) or a UNet folder itself."""
    trained = Path(trained)
    for candidate in (trained / "unet", trained):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    raise FileNotFoundError(f"No diffusers UNet (config.json + safetensors) in {trained} or {trained / 'unet'}.")


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


HYPERPARAMETERS = (
    "method",
    "learning_rate",
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "use_lora",
    "lora_rank",
    "mixed_precision",
    "gradient_checkpointing",
    "use_ema",
    "sampler",
    "num_inference_steps",
    "refl_step_range",
    "guidance_scale",
    "reward_loss_weight",
    "reward_threshold",
    "pretrain_loss_weight",
    "pretrain_data",
    "ranked_samples_per_prompt",
    "ranked_rounds",
    "seed",
)


# The model card (huggingface_hub's ``ModelCard.from_template``, Jinja2); ``card_data`` is the YAML metadata.
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

Stable Diffusion ({{ base_name }}) fine-tuned for text-image alignment with caption rewards, the coarse stage of \
RealignDiff (arXiv 2305.19599).
{%- if method == "refl" %} Trained with reward feedback learning (ReFL, ImageReward arXiv 2304.05977) on a \
differentiable caption reward, with the denoising loss as regulariser.
{%- else %} Trained with reward-ranked fine-tuning (FineRewards' assemble learning, RAFT arXiv 2304.06767): samples \
ranked by the sum of their ranks under each reward, the best kept and learned with the denoising loss, the best round \
kept.
{%- endif %}

## Usage

{% if unet_only -%}
This repository holds only the fine-tuned UNet. Load it into the base pipeline:

```python
from realign_pipeline import RealignDiffPipeline

pipe = RealignDiffPipeline.from_pretrained("{{ base_name }}", realign_unet="{{ repo_id }}")
```

or with diffusers alone:

```python
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{{ repo_id }}", subfolder="unet")
pipe = StableDiffusionPipeline.from_pretrained("{{ base_name }}", unet=unet)
```
{%- else -%}
A complete Stable Diffusion pipeline with the fine-tuned UNet. Plain diffusers:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{{ repo_id }}")
```

With RealignDiff's fine stage (mask-guided attention re-weighting), from the `pipeline.py` in this repository:

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ repo_id }}", custom_pipeline="{{ repo_id }}", trust_remote_code=True)
image = pipe("a red book and a yellow vase").images[0]
```
{%- endif %}

## Rewards

{{ reward_table or "(not recorded)" }}

## Training

Prompt set: `{{ prompt_set }}` ({{ num_prompts }} prompts); {{ global_step }} optimizer steps.
{%- if hyperparameter_table %}

{{ hyperparameter_table }}
{%- endif %}
{%- if images %}

## Samples (validation prompts, same seeds)
{%- for label, path in images.items() %}

**{{ label }}**

![{{ label }}]({{ path }})
{%- endfor %}
{%- endif %}
{%- if validation_table %}

## Validation rewards

{{ validation_table }}
{%- endif %}
{%- if eval_table %}

## Evaluation

{{ eval_table }}
{%- endif %}

## License

`{{ license_name }}`, as the base model.
"""


def build_model_card(
    summary: Mapping[str, Any],
    repo_id: str,
    base_model: str,
    unet_only: bool,
    license: str = "creativeml-openrail-m",
    eval_table: str | None = None,
    images: Mapping[str, str] | None = None,
) -> ModelCard:
    """The model card: metadata (base model, license, tags) and a body with usage, rewards and
    their weights, hyperparameters, prompt set, before/after samples and evaluation tables
    (``MODEL_CARD_TEMPLATE``). Local absolute paths appear by their last part only."""
    config = {key: public_name(value) for key, value in summary.get("config", {}).items()}
    method = config.get("method", summary.get("method", "refl"))
    local_base = Path(base_model).is_absolute()
    base_model = public_name(base_model)
    card_data = ModelCardData(
        base_model=None if local_base else base_model,  # metadata names Hub ids only
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=REPO_TAGS + (["lora"] if config.get("use_lora") else []) + [method.replace("_", "-")],
        inference=True,
    )
    reward_rows = [
        {"reward": public_name(spec.get("label", spec.get("name"))), "weight": float(spec.get("weight", 1.0))}
        for spec in config.get("rewards", [])
    ]
    hyper_rows = [{"setting": key, "value": json.dumps(config[key])} for key in HYPERPARAMETERS if key in config]
    card = ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE,
        title=repo_id.split("/")[-1],
        base_name=base_model,
        method=method,
        unet_only=unet_only,
        repo_id=repo_id,
        reward_table=_markdown_table(reward_rows),
        prompt_set=config.get("prompts", "unknown"),
        num_prompts=summary.get("num_prompts", "?"),
        global_step=summary.get("global_step", "?"),
        hyperparameter_table=_markdown_table(hyper_rows),
        images=dict(images or {}),
        validation_table=_markdown_table(summary.get("validation_table") or []),
        eval_table=(eval_table or "").strip(),
        license_name=license,
    )
    return card


def build_upload_folder(
    trained: str | Path,
    folder: str | Path,
    repo_id: str,
    base_model: str | None = None,
    unet_only: bool = False,
    license: str = "creativeml-openrail-m",
    eval_table: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write exactly what ``push_folder`` will upload into ``folder``.

    ``trained`` is a training output folder (``unet/``, ``training_summary.json``, sample grids)
    or a bare UNet folder (then ``base_model`` is required). ``revision`` is the base model's.
    """
    trained, folder = Path(trained), Path(folder)
    unet_source = unet_folder_of(trained)  # first: a missing folder is reported as such
    summary = read_summary(trained)
    if base_model is None:
        base_model = summary.get("config", {}).get("pretrained_model")
        revision = revision or summary.get("config", {}).get("revision")
    if not base_model:
        raise ValueError("No base model: pass base_model (it is not in a training_summary.json here).")
    if folder.exists() and any(folder.iterdir()):
        if not is_staging_folder(folder):
            raise FileExistsError(f"{folder} is not empty; everything in it would be uploaded. Use an empty folder.")
        shutil.rmtree(folder)  # an earlier build (a dry run): built again, so it matches these arguments
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGING_MARKER).write_text("written by realign push; never uploaded\n")
    if unet_only:
        shutil.copytree(unet_source, folder / "unet", dirs_exist_ok=True)
    else:
        from diffusers import UNet2DConditionModel

        from .pipeline_realign_diff import RealignDiffPipeline

        unet = UNet2DConditionModel.from_pretrained(unet_source, use_safetensors=True)
        pipe = RealignDiffPipeline.from_pretrained(base_model, unet=unet, revision=revision)
        pipe.save_pretrained(folder, safe_serialization=True)
    images = {}
    for label, name in (("Before fine-tuning", "samples_before.png"), ("After fine-tuning", "samples_after.png")):
        if (trained / name).is_file():
            (folder / "images").mkdir(exist_ok=True)
            shutil.copyfile(trained / name, folder / "images" / name)
            images[label] = f"images/{name}"
    card = build_model_card(summary, repo_id, base_model, unet_only, license, eval_table, images)
    card.save(folder / "README.md")
    return folder


# -- uploading --------------------------------------------------------------------------------------


def commit_operations(folder: str | Path) -> list[CommitOperationAdd]:
    """One addition per file under ``folder``, at its relative path (the staging marker left out)."""
    folder = Path(folder)
    return [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != STAGING_MARKER
    ]


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload RealignDiff caption-reward fine-tuned model",
    api: HfApi | None = None,
) -> CommitInfo:
    """Create the repo if needed and upload everything under ``folder`` in one commit.

    ``revision`` is the branch to commit to (created if missing; with ``create_pr`` the PR's base).
    ``api`` lets a caller point at another endpoint (a local server in tests). A repository this call
    created is deleted again when the commit fails, so a failed upload leaves no empty repository.
    Network and Hub errors are raised as one ``HubError``.
    """
    api = api or HfApi(token=token)
    operations = commit_operations(folder)
    try:
        existed = api.repo_exists(repo_id, token=token, repo_type="model")
    except OSError as error:  # offline, unreachable, unauthorised: nothing was created
        raise HubError(f"cannot reach the Hub: {_first_line(error)}") from error
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            token=token,
            repo_type="model",
        )
    except OSError as error:
        left = ""
        if not existed:
            try:
                api.delete_repo(repo_id, token=token, repo_type="model", missing_ok=True)
            except OSError:
                left = f" (and the new, empty repository {repo_id} could not be deleted: delete it on the Hub)"
        raise HubError(f"the upload failed: {_first_line(error)}{left}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def push_pipeline(
    trained: str | Path,
    repo_id: str,
    base_model: str | None = None,
    unet_only: bool = False,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    license: str = "creativeml-openrail-m",
    eval_table: str | None = None,
    staging_dir: str | Path | None = None,
    api: HfApi | None = None,
) -> CommitInfo:
    """Build the upload folder (a full pipeline, or ``unet/`` alone) with its model card and push it
    in one commit. ``staging_dir`` keeps the folder (for a look before pushing); default: a temporary one."""
    with tempfile.TemporaryDirectory(prefix="realign-push-") as temporary:
        folder = Path(staging_dir) if staging_dir is not None else Path(temporary) / "repo"
        build_upload_folder(trained, folder, repo_id, base_model, unet_only, license, eval_table)
        return push_folder(folder, repo_id, token, private, create_pr, revision, api=api)
