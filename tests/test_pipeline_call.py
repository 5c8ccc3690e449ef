"""Tests of ``RealignDiffPipeline.__call__`` as a ``StableDiffusionPipeline``: the parent's arguments, schedulers,
processors, callbacks, threads, and the checks on its inputs (issue [G] and [F] item 5).

The method's meaning (λ, the schedule, token ownership) is tested in ``test_reweighting_method.py``.
"""

import threading
import types
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

import realign_pipeline.pipeline_realign_diff as module
from realign_pipeline import LocalCaption, RealignAttnProcessor, RealignDiffPipeline
from realign_pipeline.pipeline_realign_diff import (
    REPLACEABLE_PROCESSORS,
    install_realign_processors,
    mask_to_tensor,
    reweighted_attention_fast,
    reweighted_attention_reference,
)

from .test_pipeline_realign_diff import fails_before_denoising

PROMPT = "a red book and a yellow vase"
STEPS = 4


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def halves(size=64):
    left = np.zeros((size, size), dtype=np.float32)
    left[:, : size // 2] = 1.0
    return left, 1.0 - left


def user_regions():
    left, right = halves()
    return [("a red book", left), ("a yellow vase", right)]


def load(folder, cls=RealignDiffPipeline, **kwargs):
    pipe = cls.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(toy_pipeline_folder):
    """A fresh pipeline per test: these tests change processors, schedulers and attributes."""
    return load(toy_pipeline_folder)


@pytest.fixture(scope="module")
def sd_pipe(toy_pipeline_folder):
    return load(toy_pipeline_folder, StableDiffusionPipeline)


def unet_spy(pipe):
    """Record (timestep, encoder_hidden_states) of every UNet call; returns the list and the hook handle."""
    calls = []

    def record(module, args, kwargs):
        calls.append((int(args[1]), kwargs["encoder_hidden_states"].clone()))

    return calls, pipe.unet.register_forward_pre_hook(record, with_kwargs=True)


# -- the parent's arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("realign", [True, False])
def test_negative_prompt_string_with_prompt_string(pipe, sd_pipe, realign):
    """Both strings raised TypeError (the prompt was made a list, the negative prompt was not)."""
    kwargs = dict(num_inference_steps=2, output_type="np", negative_prompt="a green cat")
    out = pipe(PROMPT, generator=seeded(), realign=realign, **kwargs)
    without = pipe(PROMPT, generator=seeded(), realign=realign, num_inference_steps=2, output_type="np")
    assert not np.allclose(out.images, without.images, atol=1e-4)
    if not realign:
        assert np.array_equal(out.images, sd_pipe(PROMPT, generator=seeded(), **kwargs).images)


def test_negative_prompt_embeds_equal_the_negative_prompt(pipe):
    negative, _ = pipe.encode_prompt("a green cat", "cpu", 1, False)
    kwargs = dict(num_inference_steps=2, output_type="np", regions=user_regions())
    by_text = pipe(PROMPT, generator=seeded(), negative_prompt="a green cat", **kwargs).images
    by_embeds = pipe(PROMPT, generator=seeded(), negative_prompt_embeds=negative, **kwargs).images
    assert np.array_equal(by_text, by_embeds)


def test_prompt_embeds_work_without_realign_and_are_refused_with_it(pipe, sd_pipe):
    embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    kwargs = dict(num_inference_steps=2, output_type="np", prompt_embeds=embeds)
    got = pipe(generator=seeded(), realign=False, **kwargs).images
    assert np.array_equal(got, sd_pipe(generator=seeded(), **kwargs).images)
    with pytest.raises(ValueError, match="`realign=True` needs the `prompt` text"):
        pipe(**kwargs)


def test_ip_adapter_inputs_are_refused_with_realign(pipe):
    embeds = [torch.zeros(2, 1, 32)]
    with pytest.raises(ValueError, match="`ip_adapter_image`/`ip_adapter_image_embeds`.*`realign=False`"):
        pipe(PROMPT, num_inference_steps=2, ip_adapter_image_embeds=embeds)


def test_custom_timesteps_without_num_inference_steps(toy_pipeline_folder):
    pipe = load(toy_pipeline_folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    calls, hook = unet_spy(pipe)
    try:
        out = pipe(PROMPT, num_inference_steps=None, timesteps=[900, 500, 100], output_type="np", generator=seeded())
    finally:
        hook.remove()
    # Coarse pass: 0.3 of 3 entries rounds to 1; fine pass: all three.
    assert [t for t, _ in calls] == [900, 900, 500, 100]
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize(
    "scheduler_class, extra",
    [
        (PNDMScheduler, {"skip_prk_steps": True}),
        (EulerDiscreteScheduler, {}),
        (DPMSolverMultistepScheduler, {}),
        (LMSDiscreteScheduler, {}),
    ],
)
def test_karras_schedulers_run_both_passes(toy_pipeline_folder, scheduler_class, extra):
    if scheduler_class is LMSDiscreteScheduler:
        pytest.importorskip("scipy")
    pipe = load(toy_pipeline_folder)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    left, _ = halves()
    regions = [user_regions(), [("a green cat", left)]]
    for kwargs in (dict(), dict(regions=regions), dict(coarse_stop_fraction=1.0)):
        out = pipe([PROMPT, "a green cat"], num_inference_steps=3, generator=seeded(), output_type="np", **kwargs)
        assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()
        assert out.layouts[0].regions
    # Two calls give the same images: each pass resets the scheduler's history.
    again = pipe([PROMPT, "a green cat"], num_inference_steps=3, generator=seeded(), output_type="np")
    first = pipe([PROMPT, "a green cat"], num_inference_steps=3, generator=seeded(), output_type="np")
    assert np.array_equal(first.images, again.images)


def test_swap_encodes_captions_with_clip_skip(pipe, monkeypatch):
    """With clip_skip the prompt rows come from an earlier layer; the swapped rows must too."""
    # diffusers 0.42's encode_prompt reads `text_encoder.text_model.final_layer_norm`, which transformers 5's
    # CLIPTextModel no longer has (clip_skip raises in StableDiffusionPipeline itself): point it at the layer.
    if not hasattr(pipe.text_encoder, "text_model"):
        shim = types.SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
        monkeypatch.setattr(pipe.text_encoder, "text_model", shim, raising=False)
    calls, hook = unet_spy(pipe)
    try:
        pipe(PROMPT, num_inference_steps=2, output_type="np", regions=user_regions(), clip_skip=1)
    finally:
        hook.remove()
    conditional = calls[0][1][1]  # fine pass, first step, conditional half
    alone, _ = pipe.encode_prompt("a yellow vase", "cpu", 1, False, clip_skip=1)
    final_layer, _ = pipe.encode_prompt("a yellow vase", "cpu", 1, False)
    assert torch.allclose(conditional[6:8], alone[0, 2:4])
    assert not torch.allclose(alone[0, 2:4], final_layer[0, 2:4], atol=1e-3)


# -- callbacks and interrupts -----------------------------------------------------------------------


def test_callback_runs_in_the_fine_pass_only(pipe):
    """A callback that raises the guidance scale at every step raises it once per fine step."""
    steps = []

    def louder(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        pipeline._guidance_scale += 1.0
        return callback_kwargs

    pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        output_type="np",
        callback_on_step_end=louder,
        coarse_stop_fraction=1.0,  # a full coarse pass, which once ran the callback too
    )
    assert steps == list(range(STEPS))
    assert pipe.guidance_scale == 5.0 + STEPS


def test_interrupt_returns_what_the_fine_pass_denoised(pipe):
    seen = {}

    def stop_after_two(pipeline, step, timestep, callback_kwargs):
        if step == 1:
            seen["latents"] = callback_kwargs["latents"].clone()
            pipeline._interrupt = True
        return callback_kwargs

    initial = torch.randn(1, 4, 16, 16, generator=seeded(5))
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        latents=initial.clone(),
        output_type="latent",
        callback_on_step_end=stop_after_two,
        coarse_stop_fraction=1.0,
    )
    assert torch.equal(out.images, seen["latents"])
    assert not torch.allclose(out.images, initial, atol=1e-3)
    assert out.layouts[0].regions


def test_interrupt_during_the_coarse_pass_returns_its_latents(pipe):
    calls = []

    def interrupt_on_second_call(module, args):
        calls.append(int(args[1]))
        if len(calls) == 2:
            pipe._interrupt = True

    hook = pipe.unet.register_forward_pre_hook(interrupt_on_second_call)
    try:
        out = pipe(PROMPT, num_inference_steps=STEPS, output_type="np", coarse_stop_fraction=1.0)
    finally:
        hook.remove()
    assert len(calls) == 2  # no fine pass
    assert out.layouts is None and out.images.shape == (1, 64, 64, 3)


# -- processors ---------------------------------------------------------------------------------------


def test_realign_false_keeps_any_processor(pipe, sd_pipe):
    """`realign=False` is the parent's call: a custom processor stays and runs."""

    class Halving(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return super().__call__(attn, hidden_states, *args, **kwargs) * 0.5

    custom = Halving()
    pipe.unet.set_attn_processor(custom)
    sd_pipe.unet.set_attn_processor(Halving())
    try:
        got = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np", realign=False).images
        expected = sd_pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np").images
    finally:
        sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert np.array_equal(got, expected)
    assert all(p is custom for p in pipe.unet.attn_processors.values())
    with pytest.raises(ValueError, match=r"\['Halving'\].*`realign=False`"):
        pipe(PROMPT, num_inference_steps=2)


def test_attention_slicing(pipe, sd_pipe):
    kwargs = dict(num_inference_steps=2, output_type="np", regions=user_regions())
    unsliced = pipe(PROMPT, generator=seeded(), **kwargs).images
    pipe.enable_attention_slicing(slice_size=1)
    sd_pipe.enable_attention_slicing(slice_size=1)
    try:
        plain = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np", realign=False).images
        expected = sd_pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np").images
    finally:
        sd_pipe.disable_attention_slicing()
    assert np.array_equal(plain, expected)
    assert all(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    with pytest.warns(UserWarning, match="attention slicing is replaced"):
        sliced = pipe(PROMPT, generator=seeded(), **kwargs).images
    assert np.array_equal(sliced, unsliced)


def test_processors_are_installed_once_and_each_call_picks_its_implementation(pipe, monkeypatch):
    assert not any(isinstance(p, RealignAttnProcessor) for p in pipe.unet.attn_processors.values())
    pipe(PROMPT, num_inference_steps=1, regions=user_regions(), output_type="np")
    installed = list(pipe.unet.attn_processors.values())
    assert all(type(p) is RealignAttnProcessor for p in installed)
    assert installed[0].attention_function is reweighted_attention_fast
    install_realign_processors(pipe.unet)  # already there: nothing changes
    assert all(a is b for a, b in zip(installed, pipe.unet.attn_processors.values()))
    calls = []

    def spy_reference(*args, **kwargs):
        calls.append("reference")
        return reweighted_attention_reference(*args, **kwargs)

    monkeypatch.setitem(module.ATTENTION_IMPLEMENTATIONS, "reference", spy_reference)
    pipe(PROMPT, num_inference_steps=4, regions=user_regions(), attention_implementation="reference")
    # Not reinstalled (a concurrent call keeps its processors); the call's state carried its function.
    assert all(a is b for a, b in zip(installed, pipe.unet.attn_processors.values()))
    assert calls and installed[0].attention_function is reweighted_attention_fast
    assert "SlicedAttnProcessor" in REPLACEABLE_PROCESSORS


def test_a_function_of_ones_own_can_replace_the_modulation(pipe):
    """``attention_implementation`` also takes a function with the reference's signature: it gets the
    modulated layers' inputs, and what it returns is what the fine pass uses."""
    seen_strengths = []

    def no_modulation(query, key, value, *, scale, strength, query_regions, key_regions):
        seen_strengths.append(float(strength.max()))
        return reweighted_attention_reference(
            query,
            key,
            value,
            scale=scale,
            strength=torch.zeros_like(strength),
            query_regions=query_regions,
            key_regions=key_regions,
        )

    kwargs = dict(num_inference_steps=4, regions=user_regions(), output_type="np", modulation_fraction=1.0)
    seeded = dict(generator=torch.Generator().manual_seed(0))
    custom = pipe(PROMPT, **seeded, attention_implementation=no_modulation, **kwargs).images
    unweighted = dict(cross_attention_weight=0.0, self_attention_weight=0.0)
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **unweighted, **kwargs).images
    assert seen_strengths and max(seen_strengths) > 0
    assert np.abs(custom - plain).max() < 1e-5
    modulated = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(modulated - plain).max() > 1e-3


def test_plain_calls_are_unchanged_by_the_installed_processors(pipe, sd_pipe):
    pipe(PROMPT, num_inference_steps=1, regions=user_regions(), output_type="np")
    converted = StableDiffusionPipeline.from_pipe(pipe)
    converted.set_progress_bar_config(disable=True)
    got = converted(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np").images
    expected = sd_pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np").images
    assert np.array_equal(got, expected)


def run_together(calls):
    """Run the calls in threads that all reach their first UNet call before any of them goes on."""
    barrier = threading.Barrier(len(calls), timeout=120)
    results, errors = [None] * len(calls), []

    def run(index, call):
        try:
            results[index] = call(barrier)
        except Exception as error:  # noqa: BLE001 (reported by the test below)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def waiting_call(pipeline, prompt, **kwargs):
    def call(barrier):
        local = threading.local()

        def wait_once(module, args):
            if threading.current_thread() is me and not getattr(local, "waited", False):
                local.waited = True
                barrier.wait()

        me = threading.current_thread()
        hook = pipeline.unet.register_forward_pre_hook(wait_once)
        try:
            return pipeline(prompt, num_inference_steps=STEPS, generator=seeded(), output_type="np", **kwargs).images
        finally:
            hook.remove()

    return call


@pytest.mark.parametrize("shared", ["same pipeline", "from_pipe"])
def test_concurrent_calls_keep_their_reweighting(pipe, shared):
    """Processors were swapped in and back per call: the short call (user regions: one pass), finishing
    first, restored the plain ones under the long call's feet (coarse pass first), whose fine pass then ran
    unmodulated. Same schedule in both: diffusers' schedulers themselves are shared state."""
    other = pipe if shared == "same pipeline" else RealignDiffPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    assert other.unet is pipe.unet
    swapped = "a yellow vase and a red book"
    calls = [
        waiting_call(pipe, PROMPT, regions=user_regions(), modulation_fraction=1.0),
        waiting_call(other, swapped, coarse_stop_fraction=1.0, modulation_fraction=1.0),
    ]
    alone = [call(threading.Barrier(1)) for call in calls]
    together = run_together(calls)
    assert np.array_equal(together[0], alone[0])
    assert np.array_equal(together[1], alone[1])


# -- input checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["cross_attention_weight", "self_attention_weight", "area_weight", "modulation_fraction"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(pipe, name, value):
    fails_before_denoising(pipe, f"`{name}` must be a finite number", **{name: value})


def test_coarse_stop_fraction_nan_and_non_numbers_are_refused(pipe):
    fails_before_denoising(pipe, "`coarse_stop_fraction` must be a finite", coarse_stop_fraction=float("nan"))
    fails_before_denoising(pipe, "`area_weight` must be a number", error=TypeError, area_weight="1")


@pytest.mark.parametrize("name", ["cross_attention_weight", "self_attention_weight"])
def test_weights_above_one_warn_and_run(pipe, name):
    with pytest.warns(UserWarning, match=f"`{name}`=2.0 > 1"):
        out = pipe(PROMPT, num_inference_steps=1, output_type="np", regions=user_regions(), **{name: 2.0})
    assert np.isfinite(out.images).all()


def test_weights_at_most_one_do_not_warn(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(PROMPT, num_inference_steps=1, output_type="np", regions=user_regions(), cross_attention_weight=1.0)


def test_realign_only_arguments_are_refused_without_realign(pipe):
    fails_before_denoising(pipe, "`regions` is used only with `realign=True`", realign=False, regions=[])
    fails_before_denoising(
        pipe, "`grounder` is used only with `realign=True`", realign=False, grounder=lambda i, c: []
    )


def test_check_inputs_runs_the_parents_checks_and_ours(pipe):
    pipe.check_inputs(PROMPT, 64, 64, None)  # the parent's positional call: no RealignDiff check fails
    with pytest.raises(ValueError, match="divisible by 8"):
        pipe.check_inputs(PROMPT, 60, 64, None, realign=True)
    with pytest.raises(ValueError, match="`modulation_fraction` must be in"):
        pipe.check_inputs(PROMPT, 64, 64, None, realign=True, modulation_fraction=2.0)


# -- regions, captioners and grounders -----------------------------------------------------------------------


def test_uint8_zero_one_masks_are_masks():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:, :2] = 1
    assert mask_to_tensor(mask, 4, 4).tolist() == [[True, True, False, False]] * 4
    assert torch.equal(mask_to_tensor(torch.from_numpy(mask), 4, 4), mask_to_tensor(mask, 4, 4))
    assert torch.equal(mask_to_tensor(PIL.Image.fromarray(mask), 4, 4), mask_to_tensor(mask, 4, 4))
    # 0-255 images keep their meaning: 100/255 is below one half.
    assert mask_to_tensor(mask * 255, 4, 4).tolist() == [[True, True, False, False]] * 4
    assert not mask_to_tensor(np.full((4, 4), 100, dtype=np.uint8), 4, 4).any()


def test_uint8_zero_one_regions_are_kept(pipe):
    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pipe(PROMPT, num_inference_steps=1, output_type="np", regions=[("a red book", left)])
    assert out.layouts[0].regions[0].mask[:, :32].all() and not out.layouts[0].regions[0].mask[:, 32:].any()


class Captioner:
    def __init__(self, output):
        self.output = output

    def __call__(self, image, prompt):
        return self.output


class Grounder:
    def __init__(self, output):
        self.output = output

    def __call__(self, image, captions):
        return self.output


@pytest.mark.parametrize(
    "output, match",
    [("a red book", r"`captioner` must return a list.*got str"), ([1], r"`captioner`.*item 0 is int"), (None, "got")],
)
def test_captioner_of_the_wrong_type_is_named(pipe, output, match):
    with pytest.raises(TypeError, match=match):
        pipe(PROMPT, num_inference_steps=1, captioner=Captioner(output))


@pytest.mark.parametrize(
    "output, error, match",
    [
        (np.ones((64, 64)), TypeError, r"`grounder` must return a list of 1 masks.*got ndarray"),
        (["left"], TypeError, r"`grounder`.*item 0 is str"),
        ([None, None], ValueError, r"`grounder` returned 2 masks for 1 captions"),
    ],
)
def test_grounder_of_the_wrong_type_is_named(pipe, output, error, match):
    with pytest.raises(error, match=match):
        pipe(PROMPT, num_inference_steps=1, captioner=Captioner(["a red book"]), grounder=Grounder(output))


def test_too_many_regions_are_refused_before_masks_are_made(pipe):
    too_many = [(f"book {i}", None) for i in range(pipe.max_regions() + 1)]
    assert pipe.max_regions() == 75
    fails_before_denoising(pipe, r"`regions\[0\]` has 76 regions; at most 75", regions=too_many)


def test_too_many_captions_are_refused(pipe):
    captions = [f"a red book {i}" for i in range(76)]
    with pytest.raises(ValueError, match="`captioner` returned 76 distinct captions; at most 75"):
        pipe(PROMPT, num_inference_steps=1, captioner=Captioner(captions))


def test_duplicate_user_captions_are_refused(pipe):
    left, right = halves()
    fails_before_denoising(pipe, "'a red book' is given twice", regions=[("a red book", left), ("a red book", right)])


def test_duplicate_captioner_captions_are_dropped_with_a_warning(pipe):
    captioner = Captioner(["a red book", LocalCaption("a red book"), "a yellow vase"])
    with pytest.warns(UserWarning, match="'a red book': it repeats an earlier caption"):
        out = pipe(PROMPT, num_inference_steps=1, output_type="np", captioner=captioner)
    layout = out.layouts[0]
    assert [r.caption for r in layout.regions] == ["a red book", "a yellow vase"]
    assert [(d.caption, d.reason) for d in layout.dropped] == [("a red book", "it repeats an earlier caption")]
