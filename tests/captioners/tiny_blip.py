"""Tiny random BLIP and BLIP-2 captioning folders, saved the way a Hub repo stores them (safetensors + processor)."""

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "a an of on the red blue yellow wooden book vase cat dog table picture".split()
IMAGE_SIZE = 16
HIDDEN = 16


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(SPECIAL + WORDS) + "\n")
    return path


def image_processor() -> BlipImageProcessor:
    # torchvision is not installed: transformers falls back to the PIL image processor.
    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def vision_config() -> dict:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        # BLIP's default initializer range (1e-10) would make every image look the same.
        "initializer_range": 0.02,
    }


def first_talkative_model(build: Callable[[], torch.nn.Module], processor, seed: int, tries: int = 20):
    """The first model, seeding ``seed``, ``seed + 1``, ..., whose greedy caption of a gray image has a word.

    A random decoder often emits only special tokens, which decode to an empty caption; searching
    a few seeds keeps the tests meaningful without depending on one RNG stream.
    """
    inputs = processor(images=[Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))], return_tensors="pt")
    for candidate in range(seed, seed + tries):
        torch.manual_seed(candidate)
        model = build().eval()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=4, num_beams=1)
        if processor.batch_decode(output, skip_special_tokens=True)[0].strip():
            return model
    raise RuntimeError(f"No seed in [{seed}, {seed + tries}) gives a model that emits a word.")


def save_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A ``BlipForConditionalGeneration`` with a BERT word-piece tokenizer whose BOS is BLIP's ``[DEC]``."""
    tokenizer = BertTokenizer(str(write_vocab(folder)), bos_token="[DEC]")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "encoder_hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    config = BlipConfig(text_config=text_config, vision_config=vision_config())
    processor = BlipProcessor(image_processor=image_processor(), tokenizer=tokenizer)
    first_talkative_model(lambda: BlipForConditionalGeneration(config), processor, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_blip2(folder: Path, seed: int = 0, num_query_tokens: int = 2) -> Path:
    """A ``Blip2ForConditionalGeneration`` with a tiny OPT decoder (BERT word pieces stand in for OPT's BPE)."""
    tokenizer = BertTokenizer(str(write_vocab(folder)), bos_token="[CLS]", eos_token="[SEP]")
    processor = Blip2Processor(image_processor(), tokenizer, num_query_tokens=num_query_tokens)  # adds <image>
    config = Blip2Config(
        vision_config=vision_config(),
        qformer_config={
            "vocab_size": len(tokenizer),
            "hidden_size": HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 2 * HIDDEN,
            "encoder_hidden_size": HIDDEN,
            "max_position_embeddings": 32,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": HIDDEN,
            "word_embed_proj_dim": HIDDEN,
            "ffn_dim": 2 * HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    first_talkative_model(lambda: Blip2ForConditionalGeneration(config), processor, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
