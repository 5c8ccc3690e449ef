import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
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


def test_resume_never_unpickles_a_planted_custom_checkpoint(toy_config, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    options = toy_config(max_train_steps=3, use_ema=True, ema_decay=0.9, output_dir=str(tmp_path / "run"))
    train(TrainConfig(**options, stop_after_steps=2))
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert (checkpoint / "ema.safetensors").is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    # accelerate would load this file with weights_only=False for a registered object.
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl"):
        train(TrainConfig(**options))
    assert not marker.exists()
    # Without the planted file the run resumes and finishes.
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    assert train(TrainConfig(**options)).finished


def test_ema_state_round_trips_through_safetensors_exactly(tmp_path):
    from diffusers.training_utils import EMAModel

    from realign_pipeline.training.checkpoint import load_ema, save_ema

    parameters = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    ema = EMAModel(parameters, decay=0.5)
    for value in (4.0, 8.0, 16.0):
        with torch.no_grad():
            for parameter in parameters:
                parameter.fill_(value)
        ema.step(parameters)
    save_ema(ema, tmp_path / "ema.safetensors")
    fresh = EMAModel([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1, 1))], decay=0.9)
    load_ema(fresh, tmp_path / "ema.safetensors")
    assert fresh.optimization_step == 3 and fresh.decay == 0.5
    # Step 1 copies (decay 0), then decay min(0.5, (1+n)/(10+n)): 2/11 at step 2, 3/12 at step 3.
    second = 2 / 11 * 4.0 + 9 / 11 * 8.0
    third = 0.25 * second + 0.75 * 16.0
    for restored, original in zip(fresh.shadow_params, ema.shadow_params):
        assert torch.equal(restored, original)
        torch.testing.assert_close(restored, torch.full_like(restored, third))
    with pytest.raises(ValueError, match="3 trainable parameters"):
        load_ema(EMAModel([torch.nn.Parameter(torch.zeros(1))] * 3), tmp_path / "ema.safetensors")


def test_ema_is_the_moving_average_and_is_what_gets_exported(toy_config, tmp_path):
    # Full fine-tune, two steps, a checkpoint after each: the EMA after step 2 must be
    # d·p1 + (1 − d)·p2 with d = min(decay, 2/11) (diffusers' EMAModel: step 1 copies), and unet/ must hold it.
    options = toy_config(
        use_lora=False, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=None, use_ema=True,
        ema_decay=0.1, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(TrainConfig(**options))
    unet = UNet2DConditionModel.from_pretrained(options["pretrained_model"], subfolder="unet")
    names = [name for name, _ in unet.named_parameters()]
    checkpoints = tmp_path / "run" / "checkpoints"
    weights = {step: load_file(checkpoints / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2)}
    emas = {step: load_file(checkpoints / f"checkpoint-{step}" / "ema.safetensors") for step in (1, 2)}
    exported = final_unet(tmp_path / "run")
    moved = 0
    for index, name in enumerate(names):
        p1, p2 = weights[1][name], weights[2][name]
        torch.testing.assert_close(emas[1][f"shadow_params.{index}"], p1, rtol=0, atol=1e-7)
        expected = 0.1 * p1 + 0.9 * p2
        torch.testing.assert_close(emas[2][f"shadow_params.{index}"], expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(exported[name], emas[2][f"shadow_params.{index}"])
        moved += int(not torch.equal(p1, p2))
    assert moved > 0  # training changed the weights, so EMA ≠ the last weights somewhere
    assert any(not torch.equal(exported[name], weights[2][name]) for name in names)


def test_validation_sees_the_ema_weights_and_training_gets_its_own_back():
    from diffusers.training_utils import EMAModel

    from realign_pipeline.training.refl import _ema_weights

    parameters = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    ema = EMAModel(parameters, decay=0.5)
    with torch.no_grad():
        parameters[0].copy_(torch.tensor([5.0, 6.0]))
    with _ema_weights(ema, parameters):
        assert parameters[0].tolist() == [1.0, 2.0]
    assert parameters[0].tolist() == [5.0, 6.0]
    with _ema_weights(None, parameters):
        assert parameters[0].tolist() == [5.0, 6.0]
