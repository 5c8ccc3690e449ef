"""Tests of the pipeline file: loading paths, the two passes, the processor, layouts and bad input."""

import ast
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import realign_pipeline.pipeline_realign_diff as module
from realign_pipeline import (
    AttentionModulationState,
    CrossAttentionRecorder,
    LocalCaption,
    PromptPhraseCaptioner,
    RealignAttnProcessor,
    RealignDiffPipeline,
    realign_processors_installed,
    reweighted_attention_reference,
)
from realign_pipeline.pipeline_realign_diff import (
    RegionTensors,
    attention_grid_size,
    mask_to_tensor,
    masks_from_attention_maps,
    partition_masks,
)
from realign_pipeline.prompts import t2i_compbench_prompts

PROMPT = "a red book and a yellow vase"
STEPS = 4
PIPELINE_FILE = Path(module.__file__)


def left_right_masks(height=64, width=64):
    left = np.zeros((height, width), dtype=np.float32)
    left[:, : width // 2] = 1.0
    return left, 1.0 - left


@pytest.fixture(scope="module")
def pipe(toy_pipeline_folder):
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe(toy_pipeline_folder):
    pipe = StableDiffusionPipeline.from_pretrained(toy_pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# -- loading paths -----------------------------------------------------------------------------


def test_pipeline_file_imports_nothing_from_the_package():
    tree = ast.parse(PIPELINE_FILE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the pipeline file must not use relative imports"
            imported.add(node.module.split(".")[0])
    assert "realign_pipeline" not in imported
    assert imported <= {
        "__future__",
        "contextlib",
        "json",
        "math",
        "re",
        "shutil",
        "warnings",
        "collections",
        "dataclasses",
        "pathlib",
        "typing",
        "numpy",
        "PIL",
        "torch",
        "diffusers",
        "tqdm",
        "transformers",
    }


def test_from_pretrained_and_from_pipe(toy_pipeline_folder, sd_pipe):
    loaded = RealignDiffPipeline.from_pretrained(toy_pipeline_folder)
    assert isinstance(loaded, RealignDiffPipeline)
    converted = RealignDiffPipeline.from_pipe(sd_pipe)
    assert isinstance(converted, RealignDiffPipeline)
    assert converted.unet is sd_pipe.unet


def test_realign_unet_replaces_the_base_unet(toy_pipeline_folder, tmp_path):
    tuned = UNet2DConditionModel.from_pretrained(toy_pipeline_folder, subfolder="unet")
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.5)
    tuned.save_pretrained(tmp_path / "repo" / "unet")
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder, realign_unet=tmp_path / "repo")
    loaded = next(pipe.unet.parameters())
    assert torch.equal(loaded, next(tuned.parameters()))
    base = next(UNet2DConditionModel.from_pretrained(toy_pipeline_folder, subfolder="unet").parameters())
    assert not torch.equal(loaded, base)
    with pytest.raises(ValueError, match="either `unet` or `realign_unet`"):
        RealignDiffPipeline.from_pretrained(toy_pipeline_folder, realign_unet=tmp_path / "repo", unet=tuned)


def test_realign_unet_refuses_pickled_weights(toy_pipeline_folder, tmp_path):
    tuned = UNet2DConditionModel.from_pretrained(toy_pipeline_folder, subfolder="unet")
    tuned.save_pretrained(tmp_path / "unet", safe_serialization=False)
    with pytest.raises(EnvironmentError):
        RealignDiffPipeline.from_pretrained(toy_pipeline_folder, realign_unet=tmp_path, realign_unet_subfolder="unet")


def test_custom_pipeline_from_file_and_folder(toy_pipeline_folder, tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    shutil.copyfile(PIPELINE_FILE, folder / "pipeline.py")
    for custom in (str(PIPELINE_FILE), str(folder)):
        loaded = DiffusionPipeline.from_pretrained(toy_pipeline_folder, custom_pipeline=custom, trust_remote_code=True)
        assert type(loaded).__name__ == "RealignDiffPipeline"
        loaded.set_progress_bar_config(disable=True)
        out = loaded(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np")
        assert out.images.shape == (1, 64, 64, 3)
        assert out.layouts[0].regions


def test_save_pretrained_loads_plain_and_as_realign(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (tmp_path / "saved" / "pipeline.py").read_text() == PIPELINE_FILE.read_text()
    assert type(StableDiffusionPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionPipeline
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "saved")) is StableDiffusionPipeline
    remote = DiffusionPipeline.from_pretrained(
        tmp_path / "saved", custom_pipeline=str(tmp_path / "saved"), trust_remote_code=True
    )
    assert type(remote).__name__ == "RealignDiffPipeline"
    with pytest.raises(ValueError, match="push_to_hub"):
        pipe.save_pretrained(tmp_path / "other", push_to_hub=True)


# -- the passes ------------------------------------------------------------------------------------


def test_realign_false_equals_stable_diffusion_bit_for_bit(pipe, sd_pipe):
    kwargs = dict(num_inference_steps=STEPS, output_type="np", negative_prompt=["blurry", "dark"])
    expected = sd_pipe([PROMPT, "a green cat"], generator=seeded(3), num_images_per_prompt=2, **kwargs).images
    got = pipe([PROMPT, "a green cat"], generator=seeded(3), num_images_per_prompt=2, realign=False, **kwargs).images
    assert np.array_equal(expected, got)


def test_zero_weights_without_swap_equal_the_unmodulated_run(pipe, sd_pipe):
    expected = sd_pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="np").images
    left, right = left_right_masks()
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="np",
        regions=[("a red book", left), ("a yellow vase", right)],
        cross_attention_weight=0.0,
        self_attention_weight=0.0,
        swap_region_embeddings=False,
        modulation_fraction=1.0,
    )
    assert np.array_equal(out.images, expected)
    modulated = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        generator=seeded(),
        output_type="np",
        regions=[("a red book", left), ("a yellow vase", right)],
        swap_region_embeddings=False,
        modulation_fraction=1.0,
    )
    assert not np.allclose(modulated.images, expected, atol=1e-4)


def test_two_passes_output_and_determinism(pipe):
    first = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(1), output_type="np", coarse_stop_fraction=1.0)
    second = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(1), output_type="np", coarse_stop_fraction=1.0)
    assert first.images.shape == first.coarse_images.shape == (1, 64, 64, 3)
    assert np.array_equal(first.images, second.images)
    assert not np.array_equal(first.images, first.coarse_images)
    layout = first.layouts[0]
    assert [region.caption for region in layout.regions] == ["a red book", "a yellow vase"]
    assert layout.regions[0].token_indices == [2, 3]
    assert layout.regions[1].token_indices == [6, 7]
    assert all(region.source == "attention" and region.mask.shape == (64, 64) for region in layout.regions)
    other = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(2), output_type="np", coarse_stop_fraction=1.0)
    assert not np.array_equal(first.images, other.images)


def test_early_stopped_coarse_pass_runs_fewer_steps(pipe):
    timesteps_seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: timesteps_seen.append(int(args[1])))
    try:
        out = pipe(PROMPT, num_inference_steps=10, generator=seeded(), output_type="np", coarse_stop_fraction=0.3)
    finally:
        hook.remove()
    # Coarse: the first 3 of the 10 timesteps (the 3rd ends on the x0 prediction); fine: all 10.
    pipe.scheduler.set_timesteps(10)
    schedule = pipe.scheduler.timesteps.tolist()
    assert timesteps_seen == schedule[:3] + schedule
    assert out.coarse_images.shape == out.images.shape


def test_batches_images_per_prompt_and_non_square(pipe):
    out = pipe(
        [PROMPT, "a green cat"],
        num_inference_steps=2,
        generator=[seeded(i) for i in range(4)],
        num_images_per_prompt=2,
        height=48,
        width=80,
        output_type="np",
    )
    assert out.images.shape == (4, 48, 80, 3)
    assert out.coarse_images.shape == (4, 48, 80, 3)
    assert [layout.prompt for layout in out.layouts] == [PROMPT, PROMPT, "a green cat", "a green cat"]
    assert all(region.mask.shape == (48, 80) for layout in out.layouts for region in layout.regions)


def test_user_regions_are_shared_by_a_prompts_images_and_skip_the_coarse_pass(pipe):
    left, right = left_right_masks(16, 16)  # any size: resized to the image
    out = pipe(
        [PROMPT, "a green cat"],
        num_inference_steps=2,
        generator=seeded(),
        num_images_per_prompt=2,
        output_type="np",
        regions=[
            [("a red book", PIL.Image.fromarray((left * 255).astype(np.uint8))), ("vase", torch.tensor(right))],
            [("green cat", left * 0.7)],
        ],
    )
    assert out.coarse_images is None
    assert len(out.layouts) == 4
    assert out.layouts[0].regions[0].mask.shape == (64, 64)
    assert torch.equal(out.layouts[0].regions[0].mask, out.layouts[1].regions[0].mask)
    assert out.layouts[0].regions[1].token_indices == [7]
    assert out.layouts[2].regions[0].token_indices == [2, 3]
    assert all(region.source == "user" for layout in out.layouts for region in layout.regions)


def test_bfloat16_path_keeps_the_pipeline_dtype(toy_pipeline_folder):
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def spy(query, key, value, **kwargs):
        seen.append(
            (query.dtype, kwargs["strength"].dtype, kwargs["query_regions"].dtype, kwargs["key_regions"].dtype)
        )
        return reweighted_attention_reference(query, key, value, **kwargs)

    left, right = left_right_masks()
    with realign_processors_installed(pipe.unet, RealignAttnProcessor(attention_function=spy)):
        state = AttentionModulationState(
            latent_size=(16, 16),
            regions=pipe._region_tensors(
                [
                    pipe.build_layout(
                        PROMPT,
                        ["a red book", "a yellow vase"],
                        [mask_to_tensor(left, 64, 64), mask_to_tensor(right, 64, 64)],
                        ["user"] * 2,
                        strict=True,
                    )
                ],
                64,
                64,
            ),
            modulate=True,
        )
        latents = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
        text = torch.randn(2, 77, 32, dtype=torch.bfloat16)
        with torch.no_grad():
            out = pipe.unet(latents, 500, encoder_hidden_states=text, cross_attention_kwargs={"realign_state": state})
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample.float()).all()
    assert seen and all(dtypes == (torch.bfloat16,) * 4 for dtypes in seen)
    images = pipe(
        PROMPT,
        num_inference_steps=2,
        generator=seeded(),
        output_type="np",
        regions=[("a red book", left), ("a yellow vase", right)],
    ).images
    assert np.isfinite(images).all()


# -- the attention processor -------------------------------------------------------------------------


def test_every_attention_layer_gets_the_processor_and_keeps_it(pipe):
    pipe.unet.set_attn_processor(AttnProcessor())
    names = list(pipe.unet.attn_processors)
    assert any(name.endswith("attn1.processor") for name in names)
    assert any(name.endswith("attn2.processor") for name in names)
    seen_inside = {}

    def spy(pipeline, step, timestep, callback_kwargs):
        seen_inside.update(pipeline.unet.attn_processors)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        pipe(PROMPT, num_inference_steps=2, generator=seeded(), callback_on_step_end=spy)
    assert set(seen_inside) == set(names)
    assert all(isinstance(p, RealignAttnProcessor) for p in seen_inside.values())
    # Left installed (never swapped back, so concurrent calls keep their re-weighting).
    assert all(isinstance(p, RealignAttnProcessor) for p in pipe.unet.attn_processors.values())
    pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_foreign_processors_are_refused_not_dropped(pipe):
    class CustomProcessor(AttnProcessor2_0):
        pass

    pipe.unet.set_attn_processor(CustomProcessor())
    try:
        with pytest.raises(ValueError, match="CustomProcessor"):
            pipe(PROMPT, num_inference_steps=2)
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_processor_without_state_is_attn_processor_2_0():
    torch.manual_seed(0)
    self_attn = Attention(query_dim=32, heads=2, dim_head=8)
    cross_attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=8)
    hidden = torch.randn(2, 64, 32)
    text = torch.randn(2, 77, 16)
    for attn, encoder in ((self_attn, None), (cross_attn, text)):
        attn.set_processor(AttnProcessor2_0())
        expected = attn(hidden, encoder_hidden_states=encoder)
        attn.set_processor(RealignAttnProcessor())
        assert torch.equal(attn(hidden, encoder_hidden_states=encoder), expected)


def two_region_state(height=8, width=8, batch=1, **kwargs):
    labels = torch.full((batch, height, width), -1, dtype=torch.long)
    labels[:, :, : width // 2] = 0
    labels[:, : height // 2, width // 2 :] = 1
    tokens = torch.zeros(batch, 2, 77, dtype=torch.bool)
    tokens[:, 0, [2, 3]] = True
    tokens[:, 1, [6, 7]] = True
    return AttentionModulationState(
        latent_size=(height, width), regions=RegionTensors(labels, tokens), modulate=True, **kwargs
    )


def test_modulation_moves_attention_toward_each_regions_tokens():
    """The property behind the method: in-mask pixels give more attention to their region's
    tokens, pixels outside give those tokens less."""
    torch.manual_seed(0)
    state = two_region_state()
    query_regions, area_factor = state.regions_on_grid((8, 8), torch.device("cpu"), torch.float32)
    key_regions = state.regions.region_tokens.transpose(1, 2).float()
    query, key = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 77, 8)
    identity = torch.eye(77).expand(1, 2, 77, 77)  # value = identity: the output is the probabilities
    kwargs = dict(scale=8**-0.5, query_regions=query_regions, key_regions=key_regions)
    plain = reweighted_attention_reference(query, key, identity, strength=torch.zeros(1, 64), **kwargs)
    reweighted = reweighted_attention_reference(query, key, identity, strength=area_factor, **kwargs)
    assert torch.allclose(plain, torch.softmax(query @ key.transpose(-1, -2) * 8**-0.5, -1), atol=1e-6)
    in_left = query_regions[0, :, 0].bool()
    share_before = plain[0, :, :, [2, 3]].sum(-1)
    share_after = reweighted[0, :, :, [2, 3]].sum(-1)
    assert (share_after[:, in_left] > share_before[:, in_left]).all()
    # Pixels of the other region push these tokens toward the row minimum: less on average (a
    # single pixel can gain share when a stronger token it attended to is pulled down more).
    in_right = query_regions[0, :, 1].bool()
    assert share_after[:, in_right].mean() < 0.5 * share_before[:, in_right].mean()
    unassigned = query_regions[0].sum(-1) == 0
    assert unassigned.any()
    assert torch.allclose(reweighted[0][:, unassigned], plain[0][:, unassigned], atol=1e-6)


def test_processor_modulates_only_the_conditional_half_and_resizes_masks():
    torch.manual_seed(0)
    self_attn = Attention(query_dim=32, heads=2, dim_head=8, processor=RealignAttnProcessor())
    cross_attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=8, processor=RealignAttnProcessor())
    state = two_region_state(16, 20, timestep=999.0)  # latents 16×20; this layer runs at half size
    hidden = torch.randn(2, 8 * 10, 32)
    text = torch.randn(2, 77, 16)
    for attn, encoder in ((cross_attn, text), (self_attn, None)):
        plain = attn(hidden, encoder_hidden_states=encoder)
        modulated = attn(hidden, encoder_hidden_states=encoder, realign_state=state)
        assert torch.equal(modulated[0], plain[0])
        assert not torch.allclose(modulated[1], plain[1], atol=1e-4)
    assert list(state.per_grid) == [(8, 10, torch.device("cpu"), torch.float32)]
    one_hot, _ = state.per_grid[(8, 10, torch.device("cpu"), torch.float32)]
    assert one_hot.shape == (1, 80, 2)
    state.modulate = False
    plain = cross_attn(hidden, encoder_hidden_states=text)
    assert torch.equal(cross_attn(hidden, encoder_hidden_states=text, realign_state=state), plain)


def test_attention_grid_size_handles_odd_and_non_square_latents():
    assert attention_grid_size(64 * 96, (64, 96)) == (64, 96)
    assert attention_grid_size(8 * 12, (64, 96)) == (8, 12)
    assert attention_grid_size(4 * 7, (13, 25)) == (4, 7)
    with pytest.raises(ValueError):
        attention_grid_size(50, (16, 16))


def test_recorder_averages_cross_attention_per_resolution(pipe):
    recorder = CrossAttentionRecorder()
    state = AttentionModulationState(latent_size=(16, 16), recorder=recorder)
    with realign_processors_installed(pipe.unet), torch.no_grad():
        pipe.unet(
            torch.randn(2, 4, 16, 16),
            10,
            encoder_hidden_states=torch.randn(2, 77, 32),
            cross_attention_kwargs={"realign_state": state},
        )
    maps = recorder.mean_maps()
    assert set(maps) == {(16, 16), (8, 8)}
    assert maps[(16, 16)].shape == (1, 16, 16, 77)
    assert torch.allclose(maps[(16, 16)].sum(-1), torch.ones(1, 16, 16), atol=1e-5)


# -- masks and captions -----------------------------------------------------------------------------


def test_masks_of_every_kind_resize_and_cut_at_half():
    soft = np.linspace(0, 1, 8, dtype=np.float32)[None].repeat(4, 0)
    as_numpy = mask_to_tensor(soft, 4, 8)
    assert as_numpy.dtype == torch.bool and as_numpy.shape == (4, 8)
    assert as_numpy[0].tolist() == [v >= 0.5 for v in soft[0]]
    pil = PIL.Image.fromarray((soft * 255).astype(np.uint8))
    assert mask_to_tensor(pil, 8, 16).shape == (8, 16)
    assert torch.equal(mask_to_tensor(torch.tensor(soft)[None], 4, 8), as_numpy)
    with pytest.raises(ValueError, match="single-channel"):
        mask_to_tensor(np.zeros((3, 4, 4)), 4, 4)
    with pytest.raises(ValueError, match="PIL image"):
        mask_to_tensor([[1, 0]], 4, 4)


def test_partition_gives_overlaps_to_the_smaller_mask():
    big = torch.zeros(8, 8, dtype=torch.bool)
    big[:, :6] = True
    small = torch.zeros(8, 8, dtype=torch.bool)
    small[2:4, 2:4] = True
    labels = partition_masks([big, small])
    assert (labels[2:4, 2:4] == 1).all()
    assert (labels[:, :6][~small[:, :6]] == 0).all()
    assert (labels[:, 6:] == -1).all()


def test_masks_from_attention_maps_pick_the_strongest_region():
    maps = torch.zeros(8, 8, 77)
    maps[:, :4, 2] = 1.0
    maps[:, 4:, 5] = 1.0
    left, right = masks_from_attention_maps(maps, [[2], [5]])
    assert left[:, :4].all() and not left[:, 4:].any()
    assert right[:, 4:].all() and not right[:, :4].any()


@pytest.mark.parametrize(
    "prompt, phrases",
    [
        ("a red book and a yellow vase", ["a red book", "a yellow vase"]),
        ("a microwave on the right of a pig", ["a microwave", "a pig"]),
        ("an oval mirror and a rectangular painting", ["an oval mirror", "a rectangular painting"]),
        ("The brown dog was lying on the green mat.", ["The brown dog", "the green mat"]),
        (
            "The striped black and white cat lay next to the soft grey blanket.",
            ["The striped black and white cat", "the soft grey blanket"],
        ),
    ],
)
def test_phrase_captioner_splits_t2i_compbench_styles(prompt, phrases):
    assert PromptPhraseCaptioner().phrases(prompt) == phrases


def test_phrase_captioner_on_t2i_compbench():
    """The yardstick: every "a X and a Y" prompt splits into its two halves, every spatial prompt
    into its two objects, and no phrase anywhere holds a word the prompt lacks."""
    captioner = PromptPhraseCaptioner()
    two_objects = spatial = 0
    for name in ("color", "shape", "texture", "spatial", "complex", "non_spatial"):
        for prompt in t2i_compbench_prompts(name, "val"):
            phrases = captioner.phrases(prompt)
            assert phrases, prompt
            prompt_words = set(re.findall(r"[\w'-]+", prompt))
            assert all(set(re.findall(r"[\w'-]+", phrase)) <= prompt_words for phrase in phrases), (prompt, phrases)
            if re.fullmatch(r"an? [\w ]+? and an? [\w ]+", prompt):
                first, second = prompt.split(" and ", 1)
                assert phrases == [first, second]
                two_objects += 1
            if name == "spatial":
                assert len(phrases) == 2, (prompt, phrases)
                spatial += 1
    assert two_objects > 600 and spatial > 250


# -- layouts and bad input ------------------------------------------------------------------------------


class FixedCaptioner:
    def __init__(self, captions):
        self.captions = captions

    def __call__(self, image, prompt):
        assert isinstance(image, PIL.Image.Image)
        return self.captions


class HalfGrounder:
    """Finds the first caption on the left half and nothing for the others."""

    name = "half-grounder"

    def __call__(self, image, captions):
        left, _ = left_right_masks(image.height, image.width)
        return [left] + [None] * (len(captions) - 1)


def test_captioner_and_grounder_with_attention_fallback_and_drops(pipe):
    captioner = FixedCaptioner([LocalCaption("a red book", box=(0, 0, 0.5, 1)), "a yellow vase", "a purple zebra"])
    with pytest.warns(UserWarning, match="purple zebra"):
        out = pipe(
            PROMPT,
            num_inference_steps=2,
            generator=seeded(),
            output_type="np",
            captioner=captioner,
            grounder=HalfGrounder(),
        )
    layout = out.layouts[0]
    assert [(r.caption, r.source) for r in layout.regions] == [
        ("a red book", "half-grounder"),
        ("a yellow vase", "attention"),
    ]
    assert layout.regions[0].box == (0, 0, 0.5, 1)
    assert layout.regions[0].mask[:, :32].all() and not layout.regions[0].mask[:, 32:].any()
    assert [d.caption for d in layout.dropped] == ["a purple zebra"]


def test_pipeline_attributes_are_the_default_captioner_and_grounder(pipe):
    pipe.captioner = FixedCaptioner(["a yellow vase"])
    try:
        out = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np")
    finally:
        pipe.captioner = None
    assert [r.caption for r in out.layouts[0].regions] == ["a yellow vase"]


def test_empty_masks_are_dropped_with_a_warning(pipe):
    left, _ = left_right_masks()
    with pytest.warns(UserWarning, match="mask is empty"):
        out = pipe(
            PROMPT,
            num_inference_steps=2,
            generator=seeded(),
            output_type="np",
            regions=[("a red book", left), ("a yellow vase", np.zeros((8, 8)))],
        )
    assert [r.caption for r in out.layouts[0].regions] == ["a red book"]
    assert out.layouts[0].dropped[0].reason == "its mask is empty"


def fails_before_denoising(pipe, match, error=ValueError, **kwargs):
    def never(*args, **kw):
        raise AssertionError("denoising started before the input was checked")

    hooks = [pipe.unet.register_forward_pre_hook(never), pipe.text_encoder.register_forward_pre_hook(never)]
    try:
        with pytest.raises(error, match=match):
            pipe(**{"prompt": PROMPT, "num_inference_steps": 2, **kwargs})
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(regions=[("a blue car", np.ones((8, 8)))]),
            r"`regions`.*'a blue car'.*\['blue', 'car'\] are not in the prompt",
        ),
        (dict(regions=[("a red boat", np.ones((8, 8)))]), r"\['boat'\] are not in the prompt"),
        (
            dict(regions=[[("a red book", np.ones((8, 8)))], [("a yellow vase", np.ones((8, 8)))]]),
            "layouts for 2 prompt",
        ),
        (dict(regions=[("a red book",)]), r"regions\[0\]\[0\]"),
        (dict(regions="a red book"), "`regions` must be a list"),
        (dict(modulation_fraction=1.5), "`modulation_fraction` must be in"),
        (dict(modulation_fraction=-0.1), "`modulation_fraction` must be in"),
        (dict(coarse_stop_fraction=0.0), "`coarse_stop_fraction` must be in"),
        (dict(cross_attention_weight=-1.0), "`cross_attention_weight` must be >= 0"),
        (dict(self_attention_weight=-0.3), "`self_attention_weight` must be >= 0"),
        (dict(area_weight=-1.0), "`area_weight` must be >= 0"),
        (dict(num_images_per_prompt=0), "`num_images_per_prompt`"),
        (dict(attention_implementation="flash"), "`attention_implementation` must be one of"),
    ],
)
def test_bad_input_raises_before_denoising(pipe, kwargs, match):
    fails_before_denoising(pipe, match, **kwargs)


def test_caption_truncated_away_by_the_token_limit_is_refused(pipe):
    prompt = " ".join(["a red book"] * 30) + " and a yellow vase"
    fails_before_denoising(pipe, "77-token limit", prompt=prompt, regions=[("a yellow vase", np.ones((8, 8)))])


def test_repeated_words_go_to_the_nearest_occurrence(pipe):
    layout = pipe.build_layout(
        "a red cube and a red ball",
        ["a red cube", "a red ball"],
        [torch.ones(4, 4, dtype=torch.bool)] * 2,
        ["user"] * 2,
        strict=True,
    )
    assert [r.token_indices for r in layout.regions] == [[2, 3], [6, 7]]


def test_a_repeated_noun_goes_to_the_phrase_whose_modifiers_precede_it(pipe):
    # "blue" is one content word from either "cube": the tie goes to the cube that follows it.
    layout = pipe.build_layout(
        "a red cube and a blue cube",
        ["a red cube", "a blue cube"],
        [torch.ones(4, 4, dtype=torch.bool)] * 2,
        ["user"] * 2,
        strict=True,
    )
    assert [r.token_indices for r in layout.regions] == [[2, 3], [6, 7]]


def test_swap_replaces_only_region_tokens(pipe):
    layout = pipe.build_layout(PROMPT, ["a yellow vase"], [torch.ones(4, 4, dtype=torch.bool)], ["user"], strict=True)
    embeds = torch.randn(1, 77, 32)
    with torch.no_grad():
        swapped = pipe._swap_region_embeddings(embeds, [layout])
    changed = (swapped != embeds).any(-1)[0].nonzero().flatten().tolist()
    assert changed == [6, 7]
    with torch.no_grad(), warnings.catch_warnings():
        caption_ids = pipe.tokenizer("a yellow vase", padding="max_length", max_length=77, return_tensors="pt")
        alone = pipe.text_encoder(caption_ids.input_ids)[0]
    assert torch.allclose(swapped[0, 6:8], alone[0, 2:4])


def test_dtype_may_be_given_by_name(toy_pipeline_folder):
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder, dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`dtype` must be a torch dtype"):
        RealignDiffPipeline.from_pretrained(toy_pipeline_folder, dtype="float17")


def test_model_cpu_offload_keeps_working(toy_pipeline_folder, sd_pipe):
    """accelerate's offload hooks wrap the models; the processors are still swapped in and back."""
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    plain = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np", realign=False).images
    expected = sd_pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np").images
    assert np.array_equal(plain, expected)
    out = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np")
    assert out.layouts[0].regions
    assert all(isinstance(p, RealignAttnProcessor) for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize(
    ("latent", "grids", "expected"),
    [
        ((64, 64), [(64, 64), (32, 32), (16, 16), (8, 8)], (16, 16)),  # SD 1.5 at 512 px: DAAM's resolution
        ((96, 96), [(96, 96), (48, 48), (24, 24), (12, 12)], (24, 24)),  # 768 px: a quarter of the latent side
        ((32, 32), [(32, 32), (16, 16), (8, 8), (4, 4)], (16, 16)),  # 256 px: not the coarse 8×8
        ((16, 16), [(16, 16), (8, 8), (4, 4)], (16, 16)),  # the shapes world: not its 4×4 mid block
        ((64, 96), [(64, 96), (32, 48), (16, 24), (8, 12)], (16, 24)),  # non-square
        ((8, 8), [(8, 8), (4, 4)], (8, 8)),  # nothing as fine as 16×16: the finest there is
    ],
)
def test_attention_map_grid(latent, grids, expected):
    assert module.attention_map_grid(grids, latent) == expected


def test_attention_map_grid_needs_a_recorded_grid():
    with pytest.raises(ValueError, match="no cross-attention maps"):
        module.attention_map_grid([], (64, 64))
