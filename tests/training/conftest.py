from pathlib import Path

import pytest

from realign_pipeline.prompts import t2i_compbench_prompts

TOY_REWARDS = Path(__file__).with_name("toy_rewards.py")


@pytest.fixture(scope="session")
def toy_model(toy_pipeline_folder):
    """The tiny random Stable Diffusion folder of tests/conftest.py."""
    return toy_pipeline_folder


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    prompts = t2i_compbench_prompts("color", "train")[:8]
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


@pytest.fixture
def toy_config(toy_model, prompt_file, tmp_path):
    """Options for a toy run taking well under a second per step."""

    def make(**changes):
        options = {
            "pretrained_model": str(toy_model),
            "prompts": str(prompt_file),
            "output_dir": str(tmp_path / "run"),
            "rewards": [{"name": f"{TOY_REWARDS}:Brightness"}],
            "resolution": 64,
            "num_inference_steps": 6,
            "refl_step_range": [3, 6],
            "guidance_scale": 1.0,
            "learning_rate": 1e-3,
            "reward_loss_weight": 1.0,
            "reward_threshold": 1.0,
            "max_train_steps": 4,
            "checkpointing_steps": 2,
            "num_validation_prompts": 2,
            "report_to": "none",
        }
        options.update(changes)
        return options

    return make


@pytest.fixture(scope="session")
def six_prompt_file(tmp_path_factory):
    """Six prompts: fewer than a multiple of most global batches, so epochs have a remainder."""
    prompts = t2i_compbench_prompts("color", "train")[8:14]
    path = tmp_path_factory.mktemp("six-prompts") / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path
