"""BlipImageCaptioner and CaptionTagger on tiny random BLIP / BLIP-2 folders, loaded like Hub repos."""

import pytest
import torch
from PIL import Image
from transformers import BertConfig, Blip2ForConditionalGeneration, BlipForConditionalGeneration

from realign_pipeline.captioners import (
    BlipImageCaptioner,
    CaptionTagger,
    LLMDenseCaptioner,
    resolve_dtype,
    tags_from_caption,
)
from realign_pipeline.llm import JsonChatClient

from ..servers.openai_stub import STUB_API_KEY, chat_reply
from .tiny_blip import WORDS


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (24, 32), (220, 20, 20)), Image.new("RGBA", (40, 40), (20, 20, 220, 255))]


def check_captions(captions, count):
    assert isinstance(captions, list) and len(captions) == count
    for caption in captions:
        assert isinstance(caption, str) and caption == caption.strip()
        assert set(caption.split()) <= set(WORDS)  # vocabulary words; special and image tokens decoded away


@pytest.mark.parametrize(
    ("folder", "model_class"),
    [("tiny_blip_folder", BlipForConditionalGeneration), ("tiny_blip2_folder", Blip2ForConditionalGeneration)],
    ids=["blip", "blip-2"],
)
def test_caption_batch_is_deterministic(request, folder, model_class, images):
    captioner = BlipImageCaptioner.from_pretrained(
        request.getfixturevalue(folder), device="cpu", max_new_tokens=6, num_beams=2
    )
    assert isinstance(captioner.model, model_class) and not captioner.model.training
    assert captioner.device.type == "cpu" and captioner.model.dtype == torch.float32
    captions = captioner.caption(images)
    check_captions(captions, 2)
    assert any(captions)  # the random decoder still says something
    assert captioner.caption(images) == captions
    captioner.batch_size = 1
    assert captioner.caption(images) == captions  # batching does not change a caption
    check_captions(captioner.caption(images[:1], max_new_tokens=2, num_beams=1), 1)
    assert captioner.caption([]) == []


def test_prefix_and_dtype(tiny_blip_folder, images):
    captioner = BlipImageCaptioner.from_pretrained(tiny_blip_folder, device="cpu", dtype="bfloat16", max_new_tokens=3)
    assert captioner.model.dtype == torch.bfloat16
    captions = captioner.caption(images, prefix="a picture of")
    check_captions(captions, 2)
    assert all(caption.startswith("a picture of") for caption in captions)
    assert resolve_dtype(None) == torch.float32 and resolve_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("float17")


def test_other_model_types_are_refused(tmp_path):
    BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model"):
        BlipImageCaptioner.from_pretrained(tmp_path)


def test_tags_from_caption():
    caption = "arafed picture of a red book and two Books on the wooden table, next to a vase"
    assert tags_from_caption(caption) == ["red", "book", "books", "wooden", "table", "vase"]
    assert tags_from_caption("") == []


def test_caption_tagger(tiny_blip_folder, images):
    tagger = CaptionTagger.from_pretrained(
        tiny_blip_folder, device="cpu", prefixes=(None, "a picture of"), max_new_tokens=4, num_beams=1
    )
    captions = tagger.captions(images)
    assert [len(c) for c in captions] == [2, 2] and captions[0][1].startswith("a picture of")
    tags = tagger.tags(images)
    assert tagger(images) == tags and len(tags) == 2
    for image_tags, image_captions in zip(tags, captions):
        assert image_tags == tagger.tags_from_captions(image_captions)
        assert "picture" not in image_tags and len(set(image_tags)) == len(image_tags)
    assert CaptionTagger(lambda batch: ["a red book on a red table"] * len(batch), max_tags=2).tags(images) == [
        ["red", "book"],
        ["red", "book"],
    ]


def test_llm_captioner_reads_blip_caption_and_tags(tiny_blip_folder, openai_stub, tmp_path, images):
    blip = BlipImageCaptioner.from_pretrained(tiny_blip_folder, device="cpu", max_new_tokens=5, num_beams=1)
    caption = blip.caption(images[:1])[0]
    openai_stub.push(chat_reply({"objects": [{"caption": "a red book", "box": None}]}))
    client = JsonChatClient(base_url=openai_stub.url, api_key=STUB_API_KEY, cache_dir=tmp_path)
    captioner = LLMDenseCaptioner(client, image_captioner=blip, tagger=CaptionTagger(blip))
    assert [c.text for c in captioner(images[0], "a red book")] == ["a red book"]
    content = openai_stub.requests[0].body["messages"][0]["content"]
    assert f"Caption of the generated image: {caption or '(none)'}\n" in content
    assert f"Tags recognised in the generated image: {', '.join(tags_from_caption(caption)) or '(none)'}\n" in content
