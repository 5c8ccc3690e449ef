import math

import pytest
import torch
from PIL import Image

from realign_pipeline.rewards import ConceptMatchingReward


@pytest.fixture(scope="module")
def reward(toy_blip_folder):
    return ConceptMatchingReward.from_pretrained(toy_blip_folder)


def test_scores_are_mean_log_probabilities_of_prompt_tokens(reward):
    images = torch.zeros(2, 3, 64, 64)
    scores, info = reward(images, ["a red book", "a blue car and a dog"])
    vocabulary = len(reward.tokenizer)
    assert scores.shape == (2,)
    # A random captioner is close to uniform over the vocabulary.
    assert torch.all(scores < 0) and torch.all(scores > -2 * math.log(vocabulary))
    # Only the prompt's tokens are scored: not "a picture of", not the end token.
    assert [len(values) for values in info["token_log_probs"]] == [3, 6]
    assert torch.allclose(scores, torch.stack([values.mean() for values in info["token_log_probs"]]))


def test_a_captioner_that_always_says_red_prefers_red_prompts(toy_blip_folder):
    reward = ConceptMatchingReward.from_pretrained(toy_blip_folder)
    red = reward.tokenizer.convert_tokens_to_ids("red")
    with torch.no_grad():
        reward.model.text_decoder.cls.predictions.bias[red] = 50.0
    scores, _ = reward(torch.zeros(2, 3, 64, 64), ["red red", "blue blue"])
    assert scores[0] == pytest.approx(0.0, abs=1e-3)
    assert scores[1] < -40


def test_pil_and_tensor_inputs_agree(reward):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    tensor = torch.tensor([200, 30, 30], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 127.5 - 1
    from_pil, _ = reward([image], ["a red book"])
    from_tensor, _ = reward(tensor, ["a red book"])
    assert torch.allclose(from_pil, from_tensor, atol=1e-5)


def test_gradient_reaches_the_image(reward):
    images = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    scores, _ = reward(images, ["a red book", "a blue car"])
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in reward.model.parameters())
