"""Tests of what the re-weighting MEANS, against values computed by hand.

The other suites compare the fast path with the reference through the same processor, so a bug in
the processor or the pipeline cancels out there. Here every expected value comes from an independent
float64 implementation of DenseDiffusion's formula (Kim et al. 2023, Eq. 5-6, as adopted by RealignDiff,
arXiv 2305.19599 Sec. 3.2) written in this file, with the masks ``M`` written out by hand:

    λ_i   = w · c(t) · ρ_i,   c(t) = (t / T)^5,   ρ_i = 1 − w_area · area(region of i) / (h · w)
    S'_ij = S_ij + λ_i M_ij (max_i − S_ij) − λ_i (1 − M_ij) (S_ij − min_i),   out = softmax(S') V
"""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

import realign_pipeline.pipeline_realign_diff as module
from realign_pipeline import AttentionModulationState, RealignAttnProcessor, RealignDiffPipeline
from realign_pipeline.pipeline_realign_diff import (
    CrossAttentionRecorder,
    RegionTensors,
    masks_from_attention_maps,
    reweighted_attention_fast,
    reweighted_attention_reference,
)

PROMPT = "a red book and a yellow vase"
# The toy tokenizer spells every word of PROMPT as one token: 0 <start>, 1 a, 2 red, 3 book, 4 and, 5 a,
# 6 yellow, 7 vase, 8 <end>.
RED_BOOK_TOKENS = [2, 3]
YELLOW_VASE_TOKENS = [6, 7]
IMPLEMENTATIONS = {"fast": reweighted_attention_fast, "reference": reweighted_attention_reference}


# -- the independent implementation --------------------------------------------------------------------


def densediffusion_attention(query, key, value, scale, lam, same_region):
    """DenseDiffusion's modulated attention for one head, materialised in float64 numpy.

    ``query`` (N, d), ``key``/``value`` (K, d), ``lam`` (N,), ``same_region`` M (N, K) of 0/1.
    """
    query, key, value = (np.asarray(x, dtype=np.float64) for x in (query, key, value))
    lam = np.asarray(lam, dtype=np.float64)[:, None]
    mask = np.asarray(same_region, dtype=np.float64)
    scores = scale * query @ key.T
    row_max = scores.max(axis=1, keepdims=True)
    row_min = scores.min(axis=1, keepdims=True)
    scores = scores + lam * mask * (row_max - scores) - lam * (1 - mask) * (scores - row_min)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights @ value


def multi_head(hidden, context, heads, lam, same_region, scale):
    """The whole layer for identity projections: channels split into heads, each head modulated, re-joined."""
    head_dim = hidden.shape[-1] // heads
    outputs = [
        densediffusion_attention(
            hidden[:, h * head_dim : (h + 1) * head_dim],
            context[:, h * head_dim : (h + 1) * head_dim],
            context[:, h * head_dim : (h + 1) * head_dim],
            scale,
            lam,
            same_region,
        )
        for h in range(heads)
    ]
    return np.concatenate(outputs, axis=1)


# -- a hand-made layout ----------------------------------------------------------------------------------
#
# A 2×2 latent grid (pixels in row-major order p0 p1 / p2 p3) and five text tokens:
#   p0, p1 -> region 0, which owns token 1;   p2 -> region 1, which owns tokens 2 and 3;   p3 -> no region.
LABELS = [[0, 0], [1, -1]]
TOKENS_OF_REGION = [[1], [2, 3]]
NUM_TOKENS = 5
# Written out by hand from the comment above (not derived from the code under test).
M_CROSS = [
    [0, 1, 0, 0, 0],
    [0, 1, 0, 0, 0],
    [0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0],
]
M_SELF = [
    [1, 1, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 0],
]
TIMESTEP = 900.0
TIME_FACTOR = 0.9**5  # 0.59049
# ρ: region 0 covers 2 of 4 cells, region 1 one of 4; p3 is in no region and is never modulated.
AREA_FACTOR = [1 - 2 / 4, 1 - 2 / 4, 1 - 1 / 4, 0.0]


def hand_made_state(**kwargs):
    labels = torch.tensor([LABELS])
    region_tokens = torch.zeros(1, 2, NUM_TOKENS, dtype=torch.bool)
    for region, tokens in enumerate(TOKENS_OF_REGION):
        region_tokens[0, region, tokens] = True
    defaults = dict(latent_size=(2, 2), regions=RegionTensors(labels, region_tokens), modulate=True, timestep=TIMESTEP)
    return AttentionModulationState(**{**defaults, **kwargs})


def identity_attention(cross, attention_function):
    """A real diffusers ``Attention`` layer (2 heads of size 2) whose projections are the identity."""
    attn = Attention(
        query_dim=4,
        cross_attention_dim=4 if cross else None,
        heads=2,
        dim_head=2,
        processor=RealignAttnProcessor(attention_function),
    )
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            linear.weight.copy_(torch.eye(4))
            if linear.bias is not None:
                linear.bias.zero_()
    return attn.eval()


# -- λ: the time and area factors -------------------------------------------------------------------------


@pytest.mark.parametrize("timestep, expected", [(1000.0, 1.0), (900.0, 0.59049), (500.0, 0.03125), (0.0, 0.0)])
def test_time_factor_is_t_over_T_to_the_fifth(timestep, expected):
    assert AttentionModulationState(latent_size=(2, 2), timestep=timestep).time_factor() == pytest.approx(expected)
    state = AttentionModulationState(latent_size=(2, 2), timestep=timestep / 2, num_train_timesteps=500)
    assert state.time_factor() == pytest.approx(expected)


def test_area_factor_is_one_minus_the_area_share_of_the_pixels_region():
    state = hand_made_state()
    one_hot, area = state.regions_on_grid((2, 2), torch.device("cpu"), torch.float32)
    assert one_hot.tolist() == [[[1, 0], [1, 0], [0, 1], [0, 0]]]
    assert area[0].tolist() == pytest.approx(AREA_FACTOR)
    # The larger region is modulated less; w_area scales the penalty.
    half = hand_made_state(area_weight=0.5)
    assert half.regions_on_grid((2, 2), torch.device("cpu"), torch.float32)[1][0].tolist() == pytest.approx(
        [1 - 0.5 * 2 / 4, 1 - 0.5 * 2 / 4, 1 - 0.5 / 4, 0.0]
    )


def test_area_factor_on_a_coarser_grid():
    """Labels at image resolution (4×4, each 2×2 block one label) on the 2×2 attention grid: same layout."""
    labels = torch.tensor(LABELS).repeat_interleave(2, 0).repeat_interleave(2, 1)[None]
    state = hand_made_state(regions=RegionTensors(labels, hand_made_state().regions.region_tokens))
    one_hot, area = state.regions_on_grid((2, 2), torch.device("cpu"), torch.float32)
    assert one_hot.tolist() == [[[1, 0], [1, 0], [0, 1], [0, 0]]]
    assert area[0].tolist() == pytest.approx(AREA_FACTOR)


# -- the modulated output through RealignAttnProcessor on a real Attention layer ---------------------------


def cfg_inputs(cross):
    generator = torch.Generator().manual_seed(3 + cross)
    # Scores of a few units, so the modulation moves the output far beyond the tolerance.
    hidden = 2.0 * torch.randn(2, 4, 4, generator=generator)
    context = 2.0 * torch.randn(2, NUM_TOKENS, 4, generator=generator) if cross else None
    return hidden, context


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("cross", [True, False], ids=["cross", "self"])
def test_processor_output_equals_densediffusion_formula(cross, implementation):
    attn = identity_attention(cross, IMPLEMENTATIONS[implementation])
    hidden, context = cfg_inputs(cross)
    state = hand_made_state()
    with torch.no_grad():
        output = attn(hidden, encoder_hidden_states=context, realign_state=state)
    weight = 1.0 if cross else 0.3  # the state's defaults, DenseDiffusion's w
    lam = [weight * TIME_FACTOR * rho for rho in AREA_FACTOR]
    same_region = M_CROSS if cross else M_SELF
    keys = context if cross else hidden
    scale = 2**-0.5
    expected_conditional = multi_head(hidden[1].numpy(), keys[1].numpy(), 2, lam, same_region, scale)
    expected_unconditional = multi_head(hidden[0].numpy(), keys[0].numpy(), 2, [0.0] * 4, same_region, scale)
    np.testing.assert_allclose(output[1].numpy(), expected_conditional, atol=2e-5)
    np.testing.assert_allclose(output[0].numpy(), expected_unconditional, atol=2e-5)
    # The check has teeth: the plain output is far from the modulated one in every modulated pixel.
    plain = multi_head(hidden[1].numpy(), keys[1].numpy(), 2, [0.0] * 4, same_region, scale)
    assert (np.abs(plain - expected_conditional).max(axis=1)[:3] > 1e-3).all()


@pytest.mark.parametrize("cross", [True, False], ids=["cross", "self"])
def test_processor_weights_and_time_reach_lambda(cross):
    """λ = w·c(t)·ρ with the state's own weights and timestep, seen by the attention function."""
    seen = []

    def spy(query, key, value, **kwargs):
        seen.append(kwargs)
        return reweighted_attention_reference(query, key, value, **kwargs)

    attn = identity_attention(cross, spy)
    hidden, context = cfg_inputs(cross)
    state = hand_made_state(timestep=500.0, cross_attention_weight=0.7, self_attention_weight=0.2, area_weight=0.5)
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=context, realign_state=state)
    (kwargs,) = seen
    weight = 0.7 if cross else 0.2
    rho = [1 - 0.5 * 2 / 4, 1 - 0.5 * 2 / 4, 1 - 0.5 / 4, 0.0]
    assert kwargs["strength"][0].tolist() == pytest.approx([weight * 0.5**5 * r for r in rho])
    same_region = kwargs["query_regions"][0] @ kwargs["key_regions"][0].T
    assert same_region.tolist() == (M_CROSS if cross else M_SELF)
    assert kwargs["scale"] == pytest.approx(2**-0.5)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("cross", [True, False], ids=["cross", "self"])
def test_attention_moves_to_the_pixels_own_region(cross, implementation):
    """The qualitative meaning: each modulated pixel gives more attention to its own region's tokens (or
    pixels) and less to the rest; a pixel in no region is untouched."""
    generator = torch.Generator().manual_seed(11)
    num_keys = NUM_TOKENS if cross else 4
    # Head size = number of keys, so the values can be the identity (the fast path wants one head size).
    query = torch.randn(1, 2, 4, num_keys, generator=generator)
    key = torch.randn(1, 2, num_keys, num_keys, generator=generator)
    identity = torch.eye(num_keys).expand(1, 2, num_keys, num_keys)  # output rows are the probabilities
    same_region = torch.tensor(M_CROSS if cross else M_SELF, dtype=torch.float32)
    query_regions = torch.tensor([[[1, 0], [1, 0], [0, 1], [0, 0]]], dtype=torch.float32)
    key_regions = same_region.new_zeros(1, num_keys, 2)
    for region, tokens in enumerate(TOKENS_OF_REGION if cross else [[0, 1], [2]]):
        key_regions[0, tokens, region] = 1.0
    kwargs = dict(scale=num_keys**-0.5, query_regions=query_regions, key_regions=key_regions)
    function = IMPLEMENTATIONS[implementation]
    before = function(query, key, identity, strength=torch.zeros(1, 4), **kwargs)
    after = function(query, key, identity, strength=torch.tensor([[0.5, 0.5, 0.5, 0.0]]), **kwargs)
    own_before = (before[0] * same_region).sum(-1)
    own_after = (after[0] * same_region).sum(-1)
    assert (own_after[:, :3] > own_before[:, :3] + 1e-3).all()
    assert torch.allclose(after[0, :, 3], before[0, :, 3], atol=1e-6)


# -- which half the recorder sees -----------------------------------------------------------------------------


def test_recorder_receives_the_conditional_halfs_probabilities():
    attn = identity_attention(True, reweighted_attention_reference)
    hidden, context = cfg_inputs(True)
    recorder = CrossAttentionRecorder()
    state = hand_made_state(modulate=False, recorder=recorder)
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=context, realign_state=state)
    scale = 2**-0.5
    expected = []
    for h in range(2):
        q, k = hidden[1, :, 2 * h : 2 * h + 2].double(), context[1, :, 2 * h : 2 * h + 2].double()
        expected.append((scale * q @ k.T).softmax(-1))
    expected = torch.stack(expected).mean(0)
    assert set(recorder.sums) == {(2, 2)}
    assert recorder.sums[(2, 2)].shape == (1, 4, NUM_TOKENS)
    assert torch.allclose(recorder.sums[(2, 2)][0].double(), expected, atol=1e-6)
    assert recorder.mean_maps()[(2, 2)].shape == (1, 2, 2, NUM_TOKENS)


# -- masks from attention maps ------------------------------------------------------------------------------


def test_masks_from_attention_maps_give_each_pixel_to_the_strongest_region():
    """Two regions above their Otsu cut in the middle columns: each column goes to the larger map.

    Region A's columns are 1.0, 0.8, 0.6, 0.0 and B's 0.0, 0.7, 0.9, 1.0 (already in [0, 1]). Otsu cuts both
    between 0 and the rest (between-class variance 0.12 vs 0.09 for A, 0.141 vs 0.09 for B), so A is above
    its cut in columns 0-2 and B in 1-3; column 1 goes to A (0.8 > 0.7), column 2 to B (0.9 > 0.6).
    """
    maps = torch.zeros(3, 4, 6)
    maps[..., 1] = torch.tensor([1.0, 0.8, 0.6, 0.0])
    maps[..., 4] = torch.tensor([0.0, 0.7, 0.9, 1.0])
    region_a, region_b = masks_from_attention_maps(maps, [[1], [4]])
    assert region_a.tolist() == [[True, True, False, False]] * 3
    assert region_b.tolist() == [[False, False, True, True]] * 3


def test_masks_from_attention_maps_leave_pixels_below_every_cut_unclaimed():
    maps = torch.zeros(2, 4, 3)
    maps[..., 0] = torch.tensor([1.0, 0.9, 0.0, 0.0])
    maps[..., 2] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    first, second = masks_from_attention_maps(maps, [[0], [2]])
    assert first.tolist() == [[True, True, False, False]] * 2
    assert second.tolist() == [[False, False, False, True]] * 2


# -- through the real pipeline call -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(toy_pipeline_folder):
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def left_right_masks():
    left = torch.zeros(64, 64, dtype=torch.bool)
    left[:, :32] = True
    return left, ~left


class UNetSpy:
    """Wraps the UNet's forward: records the realign state and the text embeddings of every call."""

    def __init__(self, unet):
        self.forward = unet.forward
        self.calls = []

    def __call__(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        state = (kwargs.get("cross_attention_kwargs") or {}).get("realign_state")
        self.calls.append(
            dict(
                timestep=float(timestep),
                modulate=None if state is None else state.modulate,
                state_timestep=None if state is None else state.timestep,
                regions=None if state is None else state.regions,
                encoder_hidden_states=encoder_hidden_states.clone(),
            )
        )
        return self.forward(sample, timestep, encoder_hidden_states, *args, **kwargs)


def run_with_user_regions(pipe, monkeypatch, **kwargs):
    spy = UNetSpy(pipe.unet)
    monkeypatch.setattr(pipe.unet, "forward", spy)
    left, right = left_right_masks()
    # The vase first: region 0 is the vase (right half), region 1 the book (left half).
    regions = [("a yellow vase", right), ("a red book", left)]
    defaults = dict(num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="latent")
    pipe(PROMPT, regions=regions, **{**defaults, **kwargs})
    return spy.calls


@pytest.mark.parametrize("steps, fraction, modulated", [(5, 0.6, 3), (4, 0.5, 2), (5, 0.0, 0), (3, 1.0, 3)])
def test_modulation_runs_in_exactly_the_first_steps(pipe, monkeypatch, steps, fraction, modulated):
    strengths = []

    def spy(query, key, value, **kwargs):
        strengths.append((key.shape[2], kwargs["strength"]))
        return reweighted_attention_reference(query, key, value, **kwargs)

    monkeypatch.setitem(module.ATTENTION_IMPLEMENTATIONS, "reference", spy)
    kwargs = dict(num_inference_steps=steps, modulation_fraction=fraction, attention_implementation="reference")
    calls = run_with_user_regions(pipe, monkeypatch, **kwargs)
    assert len(calls) == steps  # user regions: the fine pass only, one CFG-batched UNet call per step
    assert [call["modulate"] for call in calls] == [True] * modulated + [False] * (steps - modulated)
    timesteps = [call["timestep"] for call in calls]
    assert timesteps == sorted(timesteps, reverse=True)  # the first steps are the noisiest (largest t)
    assert [call["state_timestep"] for call in calls] == timesteps
    # Every modulated step re-weights every attention layer with λ = w·c(t)·ρ, c(t) = (t / 1000)^5: both
    # regions cover half the image, so ρ = 1/2 at every pixel; w = 1.0 for cross-attention (77 text keys),
    # 0.3 for self-attention.
    layers_per_step = len(strengths) // max(modulated, 1)
    assert len(strengths) == layers_per_step * modulated
    for step in range(modulated):
        c = (timesteps[step] / 1000) ** 5
        for num_keys, strength in strengths[step * layers_per_step : (step + 1) * layers_per_step]:
            weight = 1.0 if num_keys == 77 else 0.3
            assert torch.allclose(strength, torch.full_like(strength, weight * c * 0.5), rtol=1e-5, atol=0)


def encode(pipe, text):
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids)[0][0]


def test_swapped_embeddings_reach_the_unet_and_regions_own_their_tokens(pipe, monkeypatch):
    calls = run_with_user_regions(pipe, monkeypatch, num_inference_steps=2, modulation_fraction=1.0)
    prompt, vase, book, empty = (encode(pipe, text) for text in (PROMPT, "a yellow vase", "a red book", ""))
    expected = prompt.clone()
    expected[YELLOW_VASE_TOKENS] = vase[[2, 3]]  # "yellow vase" is at 2, 3 in the caption's own tokens
    expected[RED_BOOK_TOKENS] = book[[2, 3]]
    for call in calls:
        unconditional, conditional = call["encoder_hidden_states"]
        assert torch.allclose(conditional, expected, atol=1e-6)
        assert torch.allclose(unconditional, empty, atol=1e-6)
        # The swap really changed something the UNet sees.
        assert not torch.allclose(conditional[YELLOW_VASE_TOKENS], prompt[YELLOW_VASE_TOKENS], atol=1e-3)
        region_tokens = call["regions"].region_tokens
        assert region_tokens.shape == (1, 2, pipe.tokenizer.model_max_length)
        assert region_tokens[0, 0].nonzero().flatten().tolist() == YELLOW_VASE_TOKENS
        assert region_tokens[0, 1].nonzero().flatten().tolist() == RED_BOOK_TOKENS
        labels = call["regions"].labels
        assert (labels[0, :, 32:] == 0).all() and (labels[0, :, :32] == 1).all()


def test_without_swap_the_unet_sees_the_prompt_encoding(pipe, monkeypatch):
    calls = run_with_user_regions(pipe, monkeypatch, num_inference_steps=1, swap_region_embeddings=False)
    assert torch.allclose(calls[0]["encoder_hidden_states"][1], encode(pipe, PROMPT), atol=1e-6)


def test_pipeline_records_the_conditional_half_in_the_coarse_pass(pipe, monkeypatch):
    """The coarse pass's recorder gets softmax(s·q kᵀ) of the conditional batch item, checked by hand
    from the inputs each cross-attention layer received."""
    records, layer_inputs = [], []

    class SpyRecorder(CrossAttentionRecorder):
        def record(self, probabilities, grid):
            records.append(probabilities.clone())
            super().record(probabilities, grid)

    def remember_inputs(attn, args, kwargs):
        layer_inputs.append((attn, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]))

    monkeypatch.setattr(module, "CrossAttentionRecorder", SpyRecorder)
    hooks = [
        m.register_forward_pre_hook(remember_inputs, with_kwargs=True)
        for name, m in pipe.unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        pipe(PROMPT, num_inference_steps=3, coarse_stop_fraction=0.34, generator=torch.Generator().manual_seed(0))
    finally:
        for hook in hooks:
            hook.remove()
    # Coarse pass: 1 step, every cross-attention layer records once; the fine pass records nothing.
    assert len(records) == len(hooks)
    for probabilities, (attn, hidden, context) in zip(records, layer_inputs):
        assert probabilities.shape[0] == 1
        with torch.no_grad():
            query = attn.to_q(hidden[1:]).double()
            key = attn.to_k(context[1:]).double()
        heads = attn.heads
        query = query.view(1, query.shape[1], heads, -1).transpose(1, 2)
        key = key.view(1, key.shape[1], heads, -1).transpose(1, 2)
        expected = (query @ key.transpose(-1, -2) * attn.scale).softmax(-1)
        assert torch.allclose(probabilities.double(), expected, atol=1e-5)
        # The unconditional half differs: recording it would fail the check above.
        unconditional = (attn.to_k(context[:1]) - attn.to_k(context[1:])).abs().max()
        assert unconditional > 1e-3


def test_masks_from_attention_maps_normalise_each_region_to_its_own_range():
    """Region A's maps sit on an offset of 5 (raw values 5.0-6.0), B's on 0: after per-region min-max
    normalisation the same columns as above go to each region (the raw values would give A everything)."""
    maps = torch.zeros(3, 4, 6)
    maps[..., 1] = 5.0 + torch.tensor([1.0, 0.8, 0.6, 0.0])
    maps[..., 4] = torch.tensor([0.0, 0.7, 0.9, 1.0])
    region_a, region_b = masks_from_attention_maps(maps, [[1], [4]])
    assert region_a.tolist() == [[True, True, False, False]] * 3
    assert region_b.tolist() == [[False, False, True, True]] * 3


@pytest.mark.parametrize("keep_graph", [False, True])
def test_recorder_detaches_unless_asked_to_keep_the_graph(keep_graph):
    probabilities = torch.rand(1, 2, 4, NUM_TOKENS, requires_grad=True)
    recorder = CrossAttentionRecorder(keep_graph=keep_graph)
    recorder.record(probabilities, (2, 2))
    assert recorder.sums[(2, 2)].requires_grad is keep_graph
    assert torch.allclose(recorder.sums[(2, 2)], probabilities.mean(1))


def test_a_single_region_is_modulated(pipe, monkeypatch):
    """A layout of one region is still a layout: the fine pass gets its tensors and re-weights."""
    spy = UNetSpy(pipe.unet)
    monkeypatch.setattr(pipe.unet, "forward", spy)
    left, _ = left_right_masks()
    pipe(PROMPT, regions=[("a red book", left)], num_inference_steps=1, modulation_fraction=1.0, output_type="latent")
    (call,) = spy.calls
    assert call["modulate"].item() is True  # a 0-d bool tensor: one compiled graph serves every step
    assert call["regions"] is not None
    assert call["regions"].region_tokens[0, 0].nonzero().flatten().tolist() == RED_BOOK_TOKENS


def test_without_guidance_every_batch_item_is_modulated():
    """``conditional_half_only=False`` (no classifier-free guidance): both items of a batch of two follow
    the formula, each with its own layout row."""
    attn = identity_attention(True, reweighted_attention_reference)
    hidden, context = cfg_inputs(True)
    single = hand_made_state().regions
    regions = RegionTensors(single.labels.repeat(2, 1, 1), single.region_tokens.repeat(2, 1, 1))
    state = hand_made_state(regions=regions, conditional_half_only=False)
    with torch.no_grad():
        output = attn(hidden, encoder_hidden_states=context, realign_state=state)
    lam = [TIME_FACTOR * rho for rho in AREA_FACTOR]
    for item in range(2):
        expected = multi_head(hidden[item].numpy(), context[item].numpy(), 2, lam, M_CROSS, 2**-0.5)
        np.testing.assert_allclose(output[item].numpy(), expected, atol=2e-5)


# -- gaps found by mutation testing ----------------------------------------------------------------------------


def region(caption, mask, tokens):
    return module.Region(caption=caption, mask=mask, token_indices=tokens, source="user", caption_token_indices=[])


def test_region_tensors_of_a_batch_mixing_layouts_with_and_without_regions(pipe):
    left, right = left_right_masks()
    layouts = [
        module.Layout(PROMPT, [region("a red book", left, RED_BOOK_TOKENS), region("a yellow vase", right, [6, 7])]),
        module.Layout(PROMPT, []),
        module.Layout(PROMPT, [region("a yellow vase", left, YELLOW_VASE_TOKENS)]),
    ]
    tensors = pipe._region_tensors(layouts, 64, 64)
    assert tensors.labels.shape == (3, 64, 64) and tensors.region_tokens.shape == (3, 2, 77)
    assert (tensors.labels[0, :, :32] == 0).all() and (tensors.labels[0, :, 32:] == 1).all()
    # The item without regions is unmodulated everywhere and owns no token ...
    assert (tensors.labels[1] == -1).all() and not tensors.region_tokens[1].any()
    # ... and the item after it still gets its own layout.
    assert (tensors.labels[2, :, :32] == 0).all() and (tensors.labels[2, :, 32:] == -1).all()
    assert tensors.region_tokens[2, 0].nonzero().flatten().tolist() == YELLOW_VASE_TOKENS
    assert not tensors.region_tokens[2, 1].any()


def test_a_region_too_small_for_a_coarse_grid_keeps_the_one_hot_width():
    labels = torch.full((1, 8, 8), -1)
    labels[0, :, :6] = 0
    labels[0, 0, 7] = 1  # one pixel: lost on a 2×2 grid
    state = AttentionModulationState(
        latent_size=(8, 8), regions=RegionTensors(labels, torch.zeros(1, 2, 4, dtype=torch.bool))
    )
    one_hot, area_factor = state.regions_on_grid((2, 2), torch.device("cpu"), torch.float32)
    assert one_hot.shape == (1, 4, 2)
    assert one_hot[0, :, 1].sum() == 0 and area_factor.shape == (1, 4)


def test_labels_are_resized_by_area_majority_not_by_the_nearest_pixel():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 1  # the pixel nearest-neighbour resizing would read for cell (0, 0)
    state = AttentionModulationState(
        latent_size=(4, 4), regions=RegionTensors(labels, torch.zeros(1, 2, 4, dtype=torch.bool))
    )
    one_hot, _ = state.regions_on_grid((2, 2), torch.device("cpu"), torch.float32)
    assert one_hot[0, 0].tolist() == [1.0, 0.0]


def test_a_recording_pass_keeps_the_attention_mask():
    attn = identity_attention(cross=True, attention_function=reweighted_attention_reference)
    torch.manual_seed(0)
    hidden, context = torch.randn(2, 4, 4), torch.randn(2, 5, 4)
    mask = torch.zeros(2, 5)
    mask[:, 3:] = -10_000.0  # the last two text tokens are padding to ignore
    state = AttentionModulationState(latent_size=(2, 2), recorder=CrossAttentionRecorder())
    with torch.no_grad():
        expected = attn(hidden, context, attention_mask=mask)
        recorded = attn(hidden, context, attention_mask=mask, realign_state=state)
    assert torch.allclose(recorded, expected, atol=1e-6)


def test_swap_skips_caption_positions_past_the_encoders_length(pipe):
    prompt_embeds = torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)
    long_caption = module.Region(
        caption="a red book",
        mask=torch.ones(64, 64, dtype=torch.bool),
        token_indices=[2, 3],
        source="captioner",
        caption_token_indices=[2, 80],  # the second word sits past the caption's 77 tokens
    )
    swapped = pipe._swap_region_embeddings(prompt_embeds, [module.Layout(PROMPT, [long_caption])])
    assert not torch.equal(swapped[0, 2], prompt_embeds[0, 2])
    assert torch.equal(swapped[0, 3], prompt_embeds[0, 3])
