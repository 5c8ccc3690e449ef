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
