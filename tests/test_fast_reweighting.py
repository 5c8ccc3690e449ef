"""Exactness of the fast re-weighting (rank-R bias in SDPA) against the materialised reference."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from realign_pipeline import (
    AttentionModulationState,
    RealignAttnProcessor,
    RealignDiffPipeline,
    realign_processors_installed,
    reweighted_attention_reference,
)
from realign_pipeline.pipeline_realign_diff import (
    RegionTensors,
    partition_masks,
    reweighted_attention_fast,
    score_row_range,
)

TOLERANCE = 1e-4


def random_layout(batch, num_queries, num_regions, generator, unassigned=0.3):
    """Labels in [-1, R) with about ``unassigned`` of the pixels in no region; one-hot and strength."""
    labels = torch.randint(0, num_regions, (batch, num_queries), generator=generator)
    labels[torch.rand(batch, num_queries, generator=generator) < unassigned] = -1
    one_hot = F.one_hot(labels.clamp(min=0), num_regions).float() * (labels >= 0)[..., None]
    strength = torch.rand(batch, num_queries, generator=generator) * (labels >= 0)
    return one_hot, strength


def both(query, key, value, **kwargs):
    return reweighted_attention_reference(query, key, value, **kwargs), reweighted_attention_fast(
        query, key, value, **kwargs
    )


@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (16, 12)])
@pytest.mark.parametrize("num_regions", [1, 2, 5, 8])
@pytest.mark.parametrize("cross", [False, True])
def test_fast_equals_reference_on_random_inputs(heads, grid, num_regions, cross):
    generator = torch.Generator().manual_seed(heads * 1000 + grid[0] * 10 + num_regions + cross)
    batch, num_queries, head_dim = 2, grid[0] * grid[1], 24
    num_keys = 77 if cross else num_queries
    # Scores of several units, as in a trained UNet, so max − min is large and the bias matters.
    query = 2 * torch.randn(batch, heads, num_queries, head_dim, generator=generator)
    key = 2 * torch.randn(batch, heads, num_keys, head_dim, generator=generator)
    value = torch.randn(batch, heads, num_keys, head_dim, generator=generator)
    query_regions, strength = random_layout(batch, num_queries, num_regions, generator)
    if cross:
        key_regions = (torch.rand(batch, num_keys, num_regions, generator=generator) < 0.08).float()
    else:
        key_regions = query_regions
    reference, fast = both(
        query,
        key,
        value,
        scale=head_dim**-0.5,
        strength=strength,
        query_regions=query_regions,
        key_regions=key_regions,
    )
    assert fast.shape == reference.shape and fast.dtype == reference.dtype
    assert (fast - reference).abs().max() < TOLERANCE


def test_full_strength_zero_strength_and_a_single_region():
    """λ = 1 zeroes the query (only the bias is left); λ = 0 everywhere is plain attention."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 48, 16, generator=generator) for _ in range(3))
    query_regions = torch.zeros(1, 48, 1)
    query_regions[0, :20, 0] = 1
    kwargs = dict(scale=0.25, query_regions=query_regions, key_regions=query_regions)
    strength = query_regions[..., 0].clone()
    reference, fast = both(query, key, value, strength=strength, **kwargs)
    assert (fast - reference).abs().max() < TOLERANCE
    plain = F.scaled_dot_product_attention(query, key, value, scale=0.25)
    _, fast = both(query, key, value, strength=torch.zeros(1, 48), **kwargs)
    assert (fast - plain).abs().max() < 1e-6


def test_row_range_is_exact_in_any_chunk_size():
    generator = torch.Generator().manual_seed(1)
    query, key = torch.randn(3, 50, 8, generator=generator), torch.randn(3, 70, 8, generator=generator)
    scores = query @ key.transpose(-1, -2) * 0.3
    expected = scores.amax(-1) - scores.amin(-1)
    rows = torch.tensor([0, 7, 8, 49])
    for chunk_elements in (1, 3 * 70 * 4, 10**9):
        assert torch.allclose(score_row_range(query, key, scale=0.3, chunk_elements=chunk_elements), expected)
        picked = score_row_range(query, key, scale=0.3, rows=rows, chunk_elements=chunk_elements)
        assert torch.allclose(picked, expected[:, rows])


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns: a check that nothing N × N is materialised."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_query_by_key_matrix_is_materialised():
    generator = torch.Generator().manual_seed(2)
    heads, num_queries, head_dim = 2, 1024, 8
    query, key, value = (torch.randn(1, heads, num_queries, head_dim, generator=generator) for _ in range(3))
    query_regions, strength = random_layout(1, num_queries, 3, generator)
    kwargs = dict(scale=head_dim**-0.5, strength=strength, query_regions=query_regions, key_regions=query_regions)
    with LargestTensor() as fast_mode:
        reweighted_attention_fast(query, key, value, chunk_elements=1 << 16, **kwargs)
    with LargestTensor() as reference_mode:
        reweighted_attention_reference(query, key, value, **kwargs)
    assert reference_mode.largest >= heads * num_queries * num_queries
    # The widened q/k/v (2 × 1024 × 16) and one chunk of scores (65536) are the largest tensors.
    assert fast_mode.largest <= max(1 << 16, heads * num_queries * 16)


def test_widened_layout_keeps_the_fused_kernel():
    """q', k', v' of one head size, laid out (B, N, heads, width): SDPA's fused flash kernel takes them as
    they are. With flash the only kernel allowed, a layout it refused would raise here instead of silently
    falling back to the math kernel (which materialises N × K scores)."""
    generator = torch.Generator().manual_seed(6)
    projections = [torch.randn(2, 64, 4 * 40, generator=generator).view(2, 64, 4, 40).transpose(1, 2) for _ in "qkv"]
    query_regions, strength = random_layout(2, 64, 3, generator)
    kwargs = dict(scale=40**-0.5, strength=strength, query_regions=query_regions, key_regions=query_regions)
    reference = reweighted_attention_reference(*projections, **kwargs)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        fast = reweighted_attention_fast(*projections, **kwargs)
    assert (fast - reference).abs().max() < TOLERANCE


def test_gradients_agree():
    """Reward fine-tuning back-propagates through modulated attention: the fast path's gradients match."""
    generator = torch.Generator().manual_seed(5)
    inputs = [2 * torch.randn(2, 2, 40, 8, generator=generator) for _ in range(2)]
    inputs.append(torch.randn(2, 2, 40, 8, generator=generator))
    query_regions, strength = random_layout(2, 40, 3, generator)
    kwargs = dict(scale=8**-0.5, strength=strength, query_regions=query_regions, key_regions=query_regions)
    weights = torch.randn(2, 2, 40, 8, generator=generator)
    gradients = []
    for function in (reweighted_attention_reference, reweighted_attention_fast):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        (function(*leaves, **kwargs) * weights).sum().backward()
        gradients.append([leaf.grad for leaf in leaves])
    for reference, fast in zip(*gradients):
        assert (fast - reference).abs().max() < TOLERANCE


def test_bfloat16_inputs_stay_close_and_keep_their_dtype():
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, 2, 64, 16, generator=generator) for _ in range(3))
    query_regions, strength = random_layout(1, 64, 3, generator)
    kwargs = dict(scale=0.25, strength=strength, query_regions=query_regions, key_regions=query_regions)
    reference = reweighted_attention_reference(query, key, value, **kwargs)
    half = [t.bfloat16() for t in (query, key, value)]
    fast = reweighted_attention_fast(*half, **{**kwargs, "strength": strength.bfloat16()})
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - reference).abs().max() < 5e-2


# -- through the processor: CFG batches, overlapping masks resized to every grid ----------------------


def overlapping_state(latent_size, batch, num_regions, generator, **kwargs):
    """Rectangles and discs that overlap, partitioned (smaller mask wins) at image resolution."""
    height, width = latent_size[0] * 8, latent_size[1] * 8
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    labels = torch.full((batch, height, width), -1, dtype=torch.long)
    tokens = torch.zeros(batch, num_regions, 77, dtype=torch.bool)
    for item in range(batch):
        masks = []
        for region in range(num_regions):
            cy, cx = torch.rand(2, generator=generator) * torch.tensor([height, width])
            ry, rx = (0.15 + 0.3 * torch.rand(2, generator=generator)) * torch.tensor([height, width])
            if region % 2:
                masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1)
            else:
                masks.append(((ys - cy).abs() < ry) & ((xs - cx).abs() < rx))
            tokens[item, region, torch.randint(1, 20, (2,), generator=generator)] = True
        labels[item] = partition_masks(masks)
    return AttentionModulationState(
        latent_size=latent_size, regions=RegionTensors(labels, tokens), modulate=True, **kwargs
    )


@pytest.mark.parametrize("latent_size", [(16, 16), (12, 20)])
@pytest.mark.parametrize("num_regions", [1, 3, 8])
def test_processor_with_cfg_batch_and_overlapping_masks(latent_size, num_regions):
    generator = torch.Generator().manual_seed(num_regions + latent_size[1])
    torch.manual_seed(0)
    self_attn = Attention(query_dim=64, heads=4, dim_head=16)
    cross_attn = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16)
    cond_batch = 2
    state = overlapping_state(latent_size, cond_batch, num_regions, generator, timestep=950.0)
    text = torch.randn(2 * cond_batch, 77, 32, generator=generator)
    for grid in (latent_size, ((latent_size[0] + 1) // 2, (latent_size[1] + 1) // 2)):
        hidden = 3 * torch.randn(2 * cond_batch, grid[0] * grid[1], 64, generator=generator)
        for attn, encoder in ((self_attn, None), (cross_attn, text)):
            outputs = []
            for function in (reweighted_attention_reference, reweighted_attention_fast):
                attn.set_processor(RealignAttnProcessor(attention_function=function))
                outputs.append(attn(hidden, encoder_hidden_states=encoder, realign_state=state))
            plain = attn(hidden, encoder_hidden_states=encoder)
            assert torch.equal(outputs[1][:cond_batch], plain[:cond_batch])  # the unconditional half
            assert not torch.allclose(outputs[0], plain, atol=1e-3)  # the modulation does something
            assert (outputs[1] - outputs[0]).abs().max() < TOLERANCE


# -- whole UNet and whole pipeline on the small test model --------------------------------------------


@pytest.fixture(scope="module")
def toy_unet(toy_pipeline_folder):
    return UNet2DConditionModel.from_pretrained(toy_pipeline_folder, subfolder="unet").eval()


@pytest.mark.parametrize("latent_size", [(16, 16), (12, 20)])
def test_unet_outputs_agree(toy_unet, latent_size):
    generator = torch.Generator().manual_seed(4)
    state = overlapping_state(latent_size, 1, 3, generator, timestep=980.0)
    latents = torch.randn(1, 4, *latent_size, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, toy_unet.config.cross_attention_dim, generator=generator)
    outputs = []
    for function in (reweighted_attention_reference, reweighted_attention_fast):
        processor = RealignAttnProcessor(attention_function=function)
        with realign_processors_installed(toy_unet, processor), torch.no_grad():
            outputs.append(
                toy_unet(
                    latents, 980, encoder_hidden_states=text, cross_attention_kwargs={"realign_state": state}
                ).sample
            )
    with torch.no_grad():
        plain = toy_unet(latents, 980, encoder_hidden_states=text).sample
    assert not torch.allclose(outputs[0][1], plain[1], atol=1e-3)
    assert (outputs[1] - outputs[0]).abs().max() < TOLERANCE


@pytest.mark.skipif(
    "attention_implementation" not in inspect.signature(RealignDiffPipeline.__call__).parameters,
    reason="RealignDiffPipeline.__call__ has no `attention_implementation` argument yet",
)
def test_pipeline_outputs_agree(toy_pipeline_folder):
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    left = np.zeros((64, 64), dtype=np.float32)
    left[8:56, 4:36] = 1.0
    right = np.zeros((64, 64), dtype=np.float32)
    right[20:44, 28:60] = 1.0  # overlaps the left one
    kwargs = dict(
        prompt="a red book and a yellow vase",
        regions=[("a red book", left), ("a yellow vase", right)],
        num_inference_steps=6,
        modulation_fraction=1.0,
        output_type="np",
    )
    images = [
        pipe(**kwargs, generator=torch.Generator().manual_seed(0), attention_implementation=name).images
        for name in ("reference", "fast")
    ]
    assert np.abs(images[0] - images[1]).max() < TOLERANCE
    coarse = [
        pipe(**{**kwargs, "regions": None}, generator=torch.Generator().manual_seed(0), attention_implementation=name)
        for name in ("reference", "fast")
    ]
    assert np.abs(coarse[0].images - coarse[1].images).max() < TOLERANCE
