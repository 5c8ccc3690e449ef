import json
import sys

import pytest

from realign_pipeline.errors import UsageError
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


def test_values_are_typed_as_the_fields_say(tmp_path):
    # YAML 1.1 reads 1e-5 as text; a float option takes it as the number it means.
    (tmp_path / "run.yaml").write_text("learning_rate: 1e-5\nreward_loss_weight: 2\nstop_after_steps: null\n")
    config = load_config(tmp_path / "run.yaml")
    assert config.learning_rate == 1e-5 and isinstance(config.learning_rate, float)
    assert config.reward_loss_weight == 2 and config.stop_after_steps is None
    assert load_config(None, ["learning_rate=3e-4"]).learning_rate == 3e-4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate: fast\n", "learning_rate must be a number, got 'fast'"),
        ("learning_rate: 0\n", "learning_rate must be a number > 0, got 0"),
        ("checkpointing_steps: 0\n", "checkpointing_steps must be an integer >= 1, got 0"),
        ("max_train_steps: 2.5\n", "max_train_steps must be an integer, got 2.5"),
        ("use_lora: 1\n", "use_lora must be true or false, got 1"),
        ("resolution: 100\n", "resolution must be an integer a multiple of 8, >= 8, got 100"),
        ("adam_beta1: 1\n", "adam_beta1 must be a number in [0, 1), got 1"),
        ("refl_step_range: [30, -1]\n", "refl_step_range must be a list of integers >= 0, got [30, -1]"),
        ("method: ppo\n", "method must be one of 'refl', 'reward_ranked', got 'ppo'"),
        ("lr_scheduler: cosin\n", "lr_scheduler must be one of 'linear', 'cosine', "),
        ("rewards: concept_matching\n", "rewards must be a list of mappings, got 'concept_matching'"),
        ("learning_rat: 1.0e-5\n", "unknown option 'learning_rat' (did you mean 'learning_rate'?)"),
        ("- a\n- b\n", "must hold a mapping of option names to values, not list"),
        ("learning_rate: [1\nseed: 2\n", "not valid YAML (line 2, column 5: expected ',' or ']', but got ':')"),
    ],
)
def test_a_bad_value_is_named_with_its_file(text, message, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {message}"), str(error.value)


def test_config_file_formats_and_overrides_are_checked(tmp_path):
    with pytest.raises(
        UsageError, match=r"run\.txt: unknown config format '\.txt'; use \.yaml, \.yml, \.json, \.toml"
    ):
        load_config(tmp_path / "run.txt")
    with pytest.raises(UsageError, match=r"run\.yaml: no such file"):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.json").write_text('{"seed": 1,}')
    with pytest.raises(UsageError, match=r"run\.json: not valid JSON \(line 1, column 12: "):
        load_config(tmp_path / "run.json")
    (tmp_path / "run.toml").write_text("seed = \n")
    with pytest.raises(UsageError, match=r"run\.toml: not valid TOML"):
        load_config(tmp_path / "run.toml")
    with pytest.raises(
        UsageError, match=r"--set 'max_train_steps': expected KEY=VALUE, e\.g\. --set max_train_steps=200"
    ):
        load_config(None, ["max_train_steps"])
    with pytest.raises(UsageError, match=r"^--set: max_train_steps must be an integer >= 1, got -2$"):
        load_config(None, ["max_train_steps=-2"])


def train_fails_with(capsys, argv, message, *absent):
    from realign_pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"realign train: error: {message}\n"
    for path in absent:
        assert not path.exists()


def test_train_finds_prompt_mistakes_before_any_model_loads(tmp_path, capsys):
    output = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"pretrained_model: {tmp_path / 'no-model'}\noutput_dir: {output}\nprompts: p.txt\n")
    train_fails_with(
        capsys,
        ["train", "--config", str(config)],
        f"pretrained_model {tmp_path / 'no-model'}: no such folder (and not a Hub repo id such as owner/name)",
        output,
    )
    # A Hub id that is not in the cache (HF_HUB_OFFLINE): had it been loaded first, its error would show instead.
    base = f"pretrained_model: someone/not-downloaded\noutput_dir: {output}\nreport_to: none\n"
    config.write_text(base)
    train_fails_with(
        capsys,
        ["train", "--config", str(config)],
        "prompts is not set: give a text file with one prompt per line, or hf:<dataset id>",
        output,
    )
    prompts = tmp_path / "prompts.txt"
    config.write_text(base + f"prompts: {prompts}\n")
    train_fails_with(
        capsys,
        ["train", "--config", str(config)],
        f"prompts: no such file {str(prompts)!r} (a text file with one prompt per line)",
        output,
    )
    prompts.write_text("# only a comment\n\n")
    train_fails_with(
        capsys,
        ["train", "--config", str(config)],
        f"prompts: {str(prompts)!r} holds no prompts (one prompt per line; # starts a comment)",
        output,
    )
    prompts.write_text("a red book\n")
    train_fails_with(
        capsys,
        ["train", "--config", str(config), "--set", "pretrain_data=regulariser"],
        "pretrain_data: 'regulariser' is not a folder with metadata.jsonl (or use hf:<dataset id> or generate)",
        output,
    )
    train_fails_with(
        capsys,
        ["train", "--config", str(config), "--set", "method=ppo"],
        "--set: method must be one of 'refl', 'reward_ranked', got 'ppo'",
        output,
    )
    train_fails_with(
        capsys,
        ["train", "--config", str(config), "--set", "rewards=[{name: concept_matchin}]"],
        "rewards[0]: unknown reward 'concept_matchin'; built in: concept_matching, caption, tags, or 'module:Name' "
        "/ 'file.py:Name'",
        output,
    )
    train_fails_with(
        capsys,
        ["train", "--config", str(config), "--set", "rewards=[{name: my_reward.py:Score}]"],
        "rewards[0]: no such file 'my_reward.py' (in 'my_reward.py:Score')",
        output,
    )
    train_fails_with(
        capsys,
        ["train", "--config", str(config), "--set", "checkpointing_steps=0"],
        "--set: checkpointing_steps must be an integer >= 1, got 0",
        output,
    )


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
