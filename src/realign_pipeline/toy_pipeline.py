"""A tiny Stable Diffusion pipeline built from configs, with random weights.

Nothing on this machine can download Stable Diffusion, so tests, benchmarks and the
fall-back demo build the same five components at toy size and save them as an ordinary
diffusers folder. Everything downstream then loads that folder through the same
``from_pretrained`` path a user takes with a Hub repo.

The tokenizer is a real ``CLIPTokenizer`` whose BPE merges spell out a fixed word
list, so prompts tokenize into one token per known word (unknown words fall back to
characters), just like CLIP's own vocabulary behaves on common English.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOY_WORDS = (
    "a an the and of on in to with left right top bottom side near next above below under behind front "
    "red green blue yellow black white brown pink purple orange gray grey silver golden wooden metallic "
    "fluffy glass leather plastic rubber fabric round square oval cubic rectangular circular triangular "
    "circle triangle cube ball book vase car cat dog bird horse cow train bench bowl apple banana table "
    "chair clock cup bottle backpack suitcase cake sheep bear girl boy man woman tree flower house boat "
    "shape shapes picture photo of is are sitting standing"
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte-to-printable-character table (GPT-2 BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def learn_bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Learn BPE merges (Sennrich et al. 2016) until every word is a single token.

    Applying the merges in order re-creates each learned word exactly, which a hand-written
    merge list does not guarantee: BPE always applies the lowest-ranked pair first.
    """
    segmented = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces in segmented.values():
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda pair: (counts[pair], pair))
        merges.append(best)
        for word, pieces in segmented.items():
            merged: list[str] = []
            index = 0
            while index < len(pieces):
                if index + 1 < len(pieces) and (pieces[index], pieces[index + 1]) == best:
                    merged.append(pieces[index] + pieces[index + 1])
                    index += 2
                else:
                    merged.append(pieces[index])
                    index += 1
            segmented[word] = merged


def write_clip_tokenizer_files(folder: str | Path, words: Iterable[str] = TOY_WORDS.split()) -> None:
    """Write ``vocab.json`` and ``merges.txt`` for a CLIP BPE tokenizer that knows ``words``.

    Known words become one token each; anything else falls back to single characters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    known = [w for w in dict.fromkeys(w.lower() for w in words) if re.fullmatch(r"[a-z]+", w) and len(w) > 1]
    merges = learn_bpe_merges(known)
    base = list(_bytes_to_unicode().values())
    vocab_tokens = base + [c + "</w>" for c in base] + [a + b for a, b in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")


def build_toy_pipeline(tokenizer: CLIPTokenizer, seed: int = 0, sample_size: int = 16) -> StableDiffusionPipeline:
    """Build a randomly initialised Stable Diffusion pipeline small enough for a CPU test.

    ``sample_size`` is the latent side; the VAE's three blocks downsample by 4, so images
    are ``4 * sample_size`` pixels on a side.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 4,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=64,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_toy_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    """Build the toy pipeline and save it as an ordinary diffusers folder; returns the folder."""
    folder = Path(folder)
    tokenizer_folder = folder / "tokenizer"
    write_clip_tokenizer_files(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, model_max_length=77)
    pipe = build_toy_pipeline(tokenizer, seed=seed, sample_size=sample_size)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
