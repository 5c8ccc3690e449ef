import json
from pathlib import Path

import pytest
import torch

from realign_pipeline.rewards import ConceptMatchingReward, import_object
from realign_pipeline.training import TrainConfig, refl_loss, step_generator, train
from realign_pipeline.training.common import load_components
from tests.rewards.toy_captioner import save_toy_blip

TOY_REWARDS = Path(__file__).with_name("toy_rewards.py")


def test_a_few_refl_steps_raise_a_toy_reward(toy_config):
    config = TrainConfig(
        **toy_config(
            use_lora=False,
            max_train_steps=4,
            train_batch_size=2,
            pretrain_data="generate",
            pretrain_generate_count=2,
            pretrain_loss_weight=0.1,
        )
    )
    result = train(config)
    scores = {row["tag"]: row["total"] for row in result.validation}
    assert result.finished and result.global_step == 4
    assert scores["after"] > scores["before"] + 0.015
    output = Path(config.output_dir)
    # The regulariser's (image, caption) pairs were made once by the base model.
    assert len((output / "regularizer" / "metadata.jsonl").read_text().splitlines()) == 2
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["config"]["method"] == "refl"
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "samples_before.png").is_file() and (output / "samples_after.png").is_file()


def test_the_caption_reward_gradient_reaches_only_the_lora_weights(toy_config, tmp_path):
    blip = save_toy_blip(tmp_path / "blip")
    config = TrainConfig(**toy_config(use_lora=True, guidance_scale=3.0, reward_threshold=0.0))
    components = load_components(config)
    reward = ConceptMatchingReward.from_pretrained(blip)
    loss, logs, scores = refl_loss(config, components, reward, ["a red book", "a blue car"], step_generator(0, 0, 0))
    assert logs["reward"] < 0 and loss.item() > 0
    loss.backward()
    lora = {n: p for n, p in components.unet.named_parameters() if "lora" in n}
    others = [p for n, p in components.unet.named_parameters() if "lora" not in n]
    assert lora and all(p.grad is not None for p in lora.values())
    assert sum(p.grad.abs().sum() for p in lora.values()) > 0
    assert all(p.grad is None and not p.requires_grad for p in others)
    assert all(p.grad is None for p in components.vae.parameters())


def test_refl_refuses_a_non_differentiable_reward(toy_config):
    config = TrainConfig(**toy_config(rewards=[{"name": f"{TOY_REWARDS}:Redness"}]))
    with pytest.raises(ValueError, match="differentiable"):
        train(config)


@pytest.mark.parametrize("with_grounder", [False, True])
def test_attribute_concentration_term_alone_trains_the_lora(toy_config, with_grounder):
    from realign_pipeline.training.attribute import AttributeConcentrationTerm

    class LeftHalfGrounder:
        name = "left-half"

        def __call__(self, image, captions):
            mask = torch.zeros(image.height, image.width, dtype=torch.bool)
            mask[:, : image.width // 2] = True
            return [mask] + [None] * (len(captions) - 1)

    config = TrainConfig(**toy_config(use_lora=True, guidance_scale=3.0, reward_loss_weight=0.0))
    components = load_components(config)
    term = AttributeConcentrationTerm(
        components.tokenizer, 1.0, grounder=LeftHalfGrounder() if with_grounder else None
    )
    prompts = ["a red book and a blue car", "a green apple"]
    assert term.token_groups(prompts[0])[0] == ["a red book", "a blue car"]

    reward = import_object(f"{TOY_REWARDS}:Brightness")()
    loss, logs, _ = refl_loss(config, components, reward, prompts, step_generator(0, 0, 0), attribute=term)
    assert logs["reward_loss"] == 0 and logs["attribute_concentration_loss"] > 0
    loss.backward()
    lora_grads = [p.grad for n, p in components.unet.named_parameters() if "lora" in n]
    assert sum(g.abs().sum() for g in lora_grads if g is not None) > 0
    # The processors were restored after the call.
    assert {type(p).__name__ for p in components.unet.attn_processors.values()} != {"RealignAttnProcessor"}


def test_six_prompts_in_batches_of_four_never_repeat_a_prompt_in_a_batch(toy_config, six_prompt_file, tmp_path):
    # 6 = 4 + 2: before whole-batch epochs, the second batch spanned two epochs and could repeat prompts.
    log_dir = tmp_path / "prompt_logs"
    log_dir.mkdir()
    reward = {"name": f"{TOY_REWARDS}:RecordingBrightness", "log_dir": str(log_dir)}
    config = TrainConfig(
        **toy_config(prompts=str(six_prompt_file), train_batch_size=4, max_train_steps=3, rewards=[reward])
    )
    assert train(config).finished
    records = [json.loads(line) for line in (log_dir / "prompts-0.jsonl").read_text().splitlines()]
    batches = [record["prompts"] for record in records if record["grad"]]
    assert len(batches) == 3 and all(len(set(batch)) == 4 for batch in batches)
    prompts = six_prompt_file.read_text().split("\n")
    assert all(set(batch) <= set(prompts) for batch in batches)
