import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from realign_pipeline.training import TrainConfig, latest_checkpoint, list_checkpoints, train

TOY_REWARDS = Path(__file__).with_name("toy_rewards.py")


def final_unet(output_dir):
    return load_file(Path(output_dir) / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_stopping_and_resuming_gives_the_uninterrupted_weights(toy_config, tmp_path):
    # LoRA, EMA, gradient accumulation and a warm-up schedule: all their state must survive.
    options = toy_config(
        max_train_steps=4,
        use_ema=True,
        ema_decay=0.9,
        gradient_accumulation_steps=2,
        lr_scheduler="linear",
        lr_warmup_steps=1,
        train_batch_size=1,
    )
    straight = train(TrainConfig(**{**options, "output_dir": str(tmp_path / "straight")}))

    interrupted = {**options, "output_dir": str(tmp_path / "interrupted")}
    first = train(TrainConfig(**interrupted, stop_after_steps=3))
    assert not first.finished and first.global_step == 3
    # Step 3's work is lost (one interval at most): the newest checkpoint is step 2.
    assert latest_checkpoint(tmp_path / "interrupted").name == "checkpoint-2"
    assert not (tmp_path / "interrupted" / "unet").exists()

    resumed = train(TrainConfig(**interrupted))
    assert resumed.finished and resumed.global_step == 4
    assert_same_weights(final_unet(tmp_path / "straight"), final_unet(tmp_path / "interrupted"))
    assert straight.global_step == 4


def test_half_written_checkpoints_are_ignored(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "training_state.json").write_text(json.dumps({"step": 2}))
    (folder / ".tmp-checkpoint-4").mkdir()  # killed while writing
    (folder / "checkpoint-6").mkdir()  # no state file: not complete
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]


@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes_to_the_same_weights(toy_config, tmp_path):
    options = toy_config(
        max_train_steps=5, checkpointing_steps=1, rewards=[{"name": f"{TOY_REWARDS}:Brightness", "delay": 0.4}]
    )
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({**options, "output_dir": str(tmp_path / "killed")}))
    command = [sys.executable, "-m", "realign_pipeline.training", "--config", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "killed" / "checkpoints" / "checkpoint-2").is_dir():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within two minutes"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert not (tmp_path / "killed" / "unet").exists(), "the run finished before it was killed"

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    train(
        TrainConfig(
            **{**options, "rewards": [{"name": f"{TOY_REWARDS}:Brightness"}], "output_dir": str(tmp_path / "straight")}
        )
    )
    assert_same_weights(final_unet(tmp_path / "straight"), final_unet(tmp_path / "killed"))
