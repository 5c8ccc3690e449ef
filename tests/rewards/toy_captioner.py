"""A BLIP captioner built from a config with random weights, saved as an ordinary folder.

Test support (``benchmarks/refl_step.py`` uses it too). Nothing here can download BLIP, so tests and
benchmarks build one (tiny, or at BLIP-base's size)
and load it back through ``ConceptMatchingReward.from_pretrained(folder)``, the path a user takes
with ``Salesforce/blip-image-captioning-base``. Its tokenizer is a BERT word-piece tokenizer over a
fixed word list plus BLIP's ``[DEC]`` start token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from realign_pipeline.rewards.concept_matching import CLIP_MEAN, CLIP_STD
from realign_pipeline.toy_pipeline import TOY_WORDS

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_toy_blip(
    folder: str | Path,
    words: Iterable[str] = TOY_WORDS.split(),
    image_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    patch_size: int = 8,
    seed: int = 0,
    vision_hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int = 4,
) -> tuple[Any, Any]:
    """A random ``BlipForConditionalGeneration`` and its ``BlipProcessor`` (the tokenizer's vocabulary
    file is written to ``folder``).

    Defaults give a model of a few hundred thousand parameters at 32 px; BLIP-base's size is
    ``hidden_size=768, num_layers=12, image_size=384, patch_size=16, num_heads=12``.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(SPECIAL_TOKENS + [w.lower() for w in words] + ["picture", "photo", "of"]))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    vision_hidden_size = vision_hidden_size or hidden_size
    intermediate_size = intermediate_size or 4 * hidden_size
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "encoder_hidden_size": vision_hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={
            "hidden_size": vision_hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "image_size": image_size,
            "patch_size": patch_size,
            # BLIP's default (1e-10) makes a random vision tower nearly constant; gradients would vanish.
            "initializer_range": 0.02,
        },
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_toy_blip(folder: str | Path, **kwargs: Any) -> Path:
    """``build_toy_blip`` saved as an ordinary folder for ``from_pretrained``; returns the folder."""
    model, processor = build_toy_blip(folder, **kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return Path(folder)
