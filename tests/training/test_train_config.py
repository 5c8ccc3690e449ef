import json
import sys

import pytest

from realign_pipeline.training import TrainConfig, load_config


def test_yaml_json_and_toml_give_the_same_config(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1.0e-4\nrefl_step_range: [10, 20]\nuse_lora: false\n")
    (tmp_path / "run.json").write_text(
        json.dumps({"learning_rate": 1e-4, "refl_step_range": [10, 20], "use_lora": False})
    )
    configs = [load_config(tmp_path / "run.yaml"), load_config(tmp_path / "run.json")]
    if sys.version_info >= (3, 11):
        (tmp_path / "run.toml").write_text("learning_rate = 1e-4\nrefl_step_range = [10, 20]\nuse_lora = false\n")
        configs.append(load_config(tmp_path / "run.toml"))
    assert all(config == configs[0] for config in configs)
    assert configs[0].learning_rate == 1e-4 and configs[0].refl_step_range == [10, 20]


def test_overrides_are_read_as_yaml_and_win(tmp_path):
    (tmp_path / "run.yaml").write_text("max_train_steps: 100\n")
    config = load_config(tmp_path / "run.yaml", ["max_train_steps=3", "pretrain_data=null", "lr_scheduler=cosine"])
    assert config.max_train_steps == 3 and config.pretrain_data is None and config.lr_scheduler == "cosine"


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rat: 1.0\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ValueError, match="refl_step_range"):
        TrainConfig(num_inference_steps=20, refl_step_range=[30, 40])
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="ppo")


def test_defaults_are_refls_settings():
    config = TrainConfig()
    assert (config.num_inference_steps, config.refl_step_range) == (40, [30, 40])
    assert config.reward_loss_weight == 1e-3 and config.learning_rate == 1e-5


def test_credentials_are_redacted_recursively_and_other_keys_kept():
    from realign_pipeline.training.config import redact_secrets

    options = {
        "rewards": [{"name": "tags", "llm": {"model": "m", "api_key": "sk-1", "max_new_tokens": 9}, "HF_TOKEN": "hf"}],
        "password": "p",
        "tokenizer": "t",
        "client-secret": ["x"],
        "seed": 3,
    }
    assert redact_secrets(options) == {
        "rewards": [
            {
                "name": "tags",
                "llm": {"model": "m", "api_key": "<redacted>", "max_new_tokens": 9},
                "HF_TOKEN": "<redacted>",
            }
        ],
        "password": "<redacted>",
        "tokenizer": "t",
        "client-secret": "<redacted>",
        "seed": 3,
    }
    assert options["rewards"][0]["llm"]["api_key"] == "sk-1"  # the input is not changed


def test_an_api_key_in_the_config_reaches_neither_files_nor_the_tracker(toy_config, tmp_path):
    from pathlib import Path

    from realign_pipeline.training import train

    secret = "sk-do-not-log-7f3a9"
    toy_rewards = Path(__file__).with_name("toy_rewards.py")
    reward = {"name": f"{toy_rewards}:KeyedBrightness", "api_key": secret, "llm": {"model": "m", "api_key": secret}}
    options = toy_config(max_train_steps=1, checkpointing_steps=1, rewards=[reward], report_to="tensorboard")
    config = TrainConfig(**options)
    train(config)
    output = Path(config.output_dir)
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["config"]["rewards"][0]["api_key"] == "<redacted>"
    assert summary["config"]["rewards"][0]["llm"] == {"model": "m", "api_key": "<redacted>"}
    event_files = list((output / "logs").rglob("events.out.tfevents.*"))
    assert event_files and any(b"<redacted>" in path.read_bytes() for path in event_files)  # hparams were logged
    for path in output.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert config.rewards[0]["api_key"] == secret  # the run itself still has it
