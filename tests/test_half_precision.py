"""The re-weighting in half precision (issue [K] item 3): fast and reference agree in fp16 and bf16, and a whole
call stays finite at 512 px in bf16 on the CPU.

The tolerance is not a guessed constant. Plain ``scaled_dot_product_attention`` in half precision is itself
off from the float64 attention of the same float32 inputs by some error ``e_plain`` (rounding the inputs and the
logits to 11 bits for fp16, 8 for bf16). The re-weighted logits are the same products plus a bias ``λ·range``
of the same size as the scores, rounded once more to the same precision (the fast path) or computed in float32
(the reference), so each function's error against DenseDiffusion's formula in float64 should be of the order of
``e_plain``: we allow twice it, for each function and for their difference. ``benchmarks/half_precision.py``
prints the measured errors (fp16: ``e_plain`` 0.005–0.008, fast 0.005–0.007, fast − reference 0.003–0.0045;
bf16: ``e_plain`` 0.055–0.061, fast 0.041–0.053, fast − reference 0.031–0.047).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from realign_pipeline import RealignDiffPipeline
from realign_pipeline.pipeline_realign_diff import reweighted_attention_fast, reweighted_attention_reference
from realign_pipeline.toy_pipeline import save_toy_pipeline

HALF_DTYPES = [torch.float16, torch.bfloat16]
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")


def formula_in_float64(query, key, value, *, scale, strength, query_regions, key_regions):
    """DenseDiffusion Eq. 5-6 written out in float64: S' = S + λM(max S − S) − λ(1 − M)(S − min S)."""
    query, key, value = query.double(), key.double(), value.double()
    scores = query @ key.transpose(-1, -2) * scale
    row_max, row_min = scores.amax(-1, keepdim=True), scores.amin(-1, keepdim=True)
    same = (query_regions.double() @ key_regions.double().transpose(-1, -2)).clamp(max=1.0)[:, None]
    lam = strength.double()[:, None, :, None]
    scores = scores + lam * same * (row_max - scores) - lam * (1.0 - same) * (scores - row_min)
    return scores.softmax(-1) @ value


def sd_like_inputs(cross: bool, seed: int):
    """One SD-1.5-like attention layer's inputs (8 heads × 40 channels, a 32 × 32 grid), CFG-free batch of 2."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, num_queries, head_dim, num_regions = 2, 8, 1024, 40, 3
    num_keys = 77 if cross else num_queries
    query = 2 * torch.randn(batch, heads, num_queries, head_dim, generator=generator)
    key = 2 * torch.randn(batch, heads, num_keys, head_dim, generator=generator)
    value = torch.randn(batch, heads, num_keys, head_dim, generator=generator)
    labels = torch.randint(-1, num_regions, (batch, num_queries), generator=generator)
    query_regions = F.one_hot(labels.clamp(min=0), num_regions).float() * (labels >= 0)[..., None]
    if cross:
        key_regions = (torch.rand(batch, num_keys, num_regions, generator=generator) < 0.08).float()
    else:
        key_regions = query_regions
    strength = torch.rand(batch, num_queries, generator=generator) * (labels >= 0)
    return (query, key, value), dict(
        scale=head_dim**-0.5, strength=strength, query_regions=query_regions, key_regions=key_regions
    )


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_fast_and_reference_agree_in_half_precision_within_plain_attentions_own_error(dtype, cross):
    (query, key, value), kwargs = sd_like_inputs(cross, seed=int(cross))
    truth = formula_in_float64(query, key, value, **kwargs)
    plain_truth = formula_in_float64(query, key, value, **{**kwargs, "strength": torch.zeros_like(kwargs["strength"])})
    half_inputs = [tensor.to(dtype) for tensor in (query, key, value)]
    half_kwargs = {**kwargs, **{name: kwargs[name].to(dtype) for name in ("strength", "query_regions", "key_regions")}}

    fast = reweighted_attention_fast(*half_inputs, **half_kwargs)
    reference = reweighted_attention_reference(*half_inputs, **half_kwargs)
    plain = F.scaled_dot_product_attention(*half_inputs, scale=kwargs["scale"])
    assert fast.dtype == reference.dtype == dtype

    def error(output, expected):
        return (output.double() - expected).abs().max().item()

    plain_error = error(plain, plain_truth)
    assert plain_error > 0  # half precision does round: the bound below is not vacuous
    assert error(fast, truth) <= 2 * plain_error
    assert error(reference, truth) <= 2 * plain_error
    assert error(fast, reference.double()) <= 2 * plain_error
    # The modulation is far larger than the rounding: the half-precision outputs follow the formula, not plain SDPA.
    assert error(fast, plain_truth) > 10 * plain_error


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_fast_in_half_precision_with_every_row_modulated_at_full_strength(dtype):
    """λ = 1 everywhere (the largest bias, ``range`` itself) is where rounding the bias could hurt most."""
    (query, key, value), kwargs = sd_like_inputs(cross=False, seed=7)
    kwargs["strength"] = torch.ones_like(kwargs["strength"])
    truth = formula_in_float64(query, key, value, **kwargs)
    plain_truth = formula_in_float64(query, key, value, **{**kwargs, "strength": torch.zeros_like(kwargs["strength"])})
    half_inputs = [tensor.to(dtype) for tensor in (query, key, value)]
    half_kwargs = {**kwargs, **{name: kwargs[name].to(dtype) for name in ("strength", "query_regions", "key_regions")}}
    fast = reweighted_attention_fast(*half_inputs, **half_kwargs)
    plain = F.scaled_dot_product_attention(*half_inputs, scale=kwargs["scale"])
    plain_error = (plain.double() - plain_truth).abs().max().item()
    assert (fast.double() - truth).abs().max().item() <= 2 * plain_error


def sd_shaped_small_pipeline(folder) -> RealignDiffPipeline:
    """The test model's UNet and text encoder with a VAE that downsamples by 8, as SD's does: at 512 px the UNet
    sees 64 × 64 latents and self-attention has SD 1.5's 4096 queries at its finest level."""
    toy = RealignDiffPipeline.from_pretrained(save_toy_pipeline(folder))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
    )
    components = {**toy.components, "vae": vae.eval()}
    return RealignDiffPipeline(**{name: components[name] for name in SD_COMPONENTS}, requires_safety_checker=False)


def test_whole_call_in_bfloat16_at_512_px_is_finite(tmp_path):
    """A small model in bf16 at 512 px (latents 64 × 64, as SD 1.5's): the default call (coarse pass, attention
    masks, re-weighted fine pass) gives finite images, and the fine pass had regions to re-weight."""
    pipe = sd_shaped_small_pipeline(tmp_path / "toy").to(dtype=torch.bfloat16)
    assert pipe.vae_scale_factor == 8
    pipe.set_progress_bar_config(disable=True)
    output = pipe(
        "a red book and a yellow vase",
        height=512,
        width=512,
        num_inference_steps=3,
        coarse_stop_fraction=0.67,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert output.images.shape == (1, 512, 512, 3)
    assert np.isfinite(output.images).all()
    assert output.images.std() > 0
    assert output.layouts[0].regions  # the fine pass had something to re-weight
