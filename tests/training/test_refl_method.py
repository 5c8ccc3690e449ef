"""ReFL's method, checked against hand formulas on a fake UNet and VAE whose outputs are known.

ImageReward (arXiv 2304.05977) Algorithm 1: no-gradient sampling down to a step drawn from the
window, one guided step with gradient, ``x̂0``, decode, ``λ·mean(relu(α − r))`` plus the weighted
denoising loss on (image, caption) pairs.
"""

import contextlib
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from realign_pipeline.training import TrainConfig, refl_loss, step_generator
from realign_pipeline.training.common import encode_prompts, guided_noise_prediction, load_components
from realign_pipeline.training.data import CaptionedImages
from realign_pipeline.training.refl import draw_refl_step, reward_feedback_loss

PROMPTS = ["a red book", "a blue car"]


class FakeUnet(torch.nn.Module):
    """``ε(x, t, c) = w·x + ⟨c, P⟩ + t/1000`` per sample, with a fixed random projection ``P``: the
    unconditional and conditional embeddings give different outputs. Records every call."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(in_channels=4)
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.projection = torch.randn(77, 32, generator=torch.Generator().manual_seed(0)) / 50
        self.calls = []

    def predict(self, sample, timestep, text):
        timestep = torch.as_tensor(timestep).float().expand(sample.shape[0])
        text_term = (text.float() * self.projection).sum(dim=(1, 2))
        return self.weight * sample + text_term.view(-1, 1, 1, 1) + timestep.view(-1, 1, 1, 1) / 1000

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None):
        output = self.predict(sample, timestep, encoder_hidden_states)
        self.calls.append(
            {
                "sample": sample.detach().clone(),
                "timestep": torch.as_tensor(timestep).expand(sample.shape[0]).clone(),
                "text": encoder_hidden_states.detach().clone(),
                "output": output.detach().clone(),
                "grad": torch.is_grad_enabled(),
            }
        )
        return SimpleNamespace(sample=output)


class FakeVae(torch.nn.Module):
    """Latents at 1/8 resolution; ``decode`` is the identity, ``encode`` an 8×8 average (std 0)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=10.0, block_out_channels=[1, 1, 1, 1])
        self.dtype = torch.float32

    def decode(self, latents):
        return SimpleNamespace(sample=latents)

    def encode(self, images):
        mean = F.avg_pool2d(images, 8)
        mean = torch.cat([mean, mean[:, :1]], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.zeros_like(mean)))


class RecordingReward:
    """Scores ``mean(image) + offset``: with ``α = 0`` the first sample is below the threshold, the second above."""

    differentiable = True

    def __init__(self):
        self.images = None
        self.scores = None

    def __call__(self, images, prompts, **context):
        self.images = images.detach().clone()
        self.scores = images.float().mean(dim=(1, 2, 3)) + torch.tensor([-1.0, 1.0])
        return self.scores, {}


@pytest.fixture
def fake_setup(toy_config):
    def make(**changes):
        options = {
            "resolution": 16,
            "num_inference_steps": 6,
            "refl_step_range": [2, 5],
            "guidance_scale": 3.0,
            "reward_threshold": 0.0,
            "reward_loss_weight": 0.5,
            "use_lora": False,
            "sampler": "ddim",
            **changes,
        }
        config = TrainConfig(**toy_config(**options))
        components = load_components(config)
        components.unet, components.vae = FakeUnet(), FakeVae()
        return config, components

    return make


def run_refl(config, components, reward, seed=0, regularizer=None):
    return refl_loss(config, components, reward, PROMPTS, step_generator(seed, 0, 0), regularizer=regularizer)


def test_guided_noise_prediction_is_classifier_free_guidance():
    uncond, cond = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    # ε(∅) + w·(ε(c) − ε(∅)) with w = 7.5: 1 + 7.5·2 = 16, −2 + 7.5·2 = 13.
    assert guided_noise_prediction(uncond, cond, 7.5).tolist() == [16.0, 13.0]
    assert guided_noise_prediction(uncond, cond, 1.0).tolist() == [3.0, 0.0]


def test_reward_feedback_loss_is_lambda_times_mean_relu():
    scores = torch.tensor([-1.0, 0.5, 3.0])
    # α = 1: relu(2), relu(0.5), relu(−2) → mean 2.5/3; λ = 0.3.
    assert reward_feedback_loss(scores, 1.0, 0.3).item() == pytest.approx(0.3 * 2.5 / 3, rel=1e-6)
    assert reward_feedback_loss(scores, -5.0, 0.3).item() == 0.0


@pytest.mark.parametrize("guidance_scale", [3.0, 1.5])
def test_the_gradient_step_uses_the_guided_prediction_and_its_x0(fake_setup, guidance_scale):
    config, components = fake_setup(guidance_scale=guidance_scale)
    reward = RecordingReward()
    loss, logs, _ = run_refl(config, components, reward)
    unet, sampler = components.unet, components.sampler
    (grad_call,) = [call for call in unet.calls if call["grad"]]
    batch = len(PROMPTS)
    latents = grad_call["sample"][:batch]
    assert torch.equal(grad_call["sample"][batch:], latents)  # the same x_t for both halves
    t = grad_call["timestep"][0]
    uncond_text = encode_prompts(components, [""] * batch, "cpu")
    cond_text = encode_prompts(components, PROMPTS, "cpu")
    with torch.no_grad():
        noise_uncond = unet.predict(latents, t, uncond_text)
        noise_cond = unet.predict(latents, t, cond_text)
    assert not torch.allclose(noise_uncond, noise_cond, atol=1e-3)  # the test can tell the halves apart
    guided = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
    alpha = sampler.alphas_cumprod[int(t)]
    x0 = (latents - (1 - alpha).sqrt() * guided) / alpha.sqrt()
    expected_images = (x0 / 10.0).clamp(-1, 1)
    torch.testing.assert_close(reward.images, expected_images, rtol=1e-5, atol=1e-6)
    # λ·mean(relu(α − r)) on the scores the reward returned, and nothing else (no regulariser here).
    expected_loss = 0.5 * F.relu(0.0 - reward.scores.detach()).mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert logs["reward_loss"] == pytest.approx(expected_loss.item(), rel=1e-6)
    assert expected_loss.item() > 0


def test_the_gradient_step_is_drawn_from_the_window_and_only_from_it(fake_setup):
    config, components = fake_setup(refl_step_range=[2, 5])
    sampler = components.sampler
    drawn = []
    for seed in range(30):
        components.unet.calls.clear()
        _, logs, _ = run_refl(config, components, RecordingReward(), seed=seed)
        no_grad_steps = [call for call in components.unet.calls if not call["grad"]]
        (grad_call,) = [call for call in components.unet.calls if call["grad"]]
        index = len(no_grad_steps)
        # The no-gradient steps are the first `index` of the schedule, then step `index` takes the gradient.
        assert [int(call["timestep"][0]) for call in no_grad_steps] == sampler.timesteps[:index].tolist()
        assert int(grad_call["timestep"][0]) == int(sampler.timesteps[index])
        assert logs["refl_step"] == index
        drawn.append(index)
    assert set(drawn) == {2, 3, 4}
    # The draw comes from the step's generator, not the global RNG: a resumed run redraws the same step.
    for seed in range(5):
        torch.manual_seed(100 + seed)
        assert run_refl(config, components, RecordingReward(), seed=seed)[1]["refl_step"] == drawn[seed]


def test_draw_refl_step_covers_the_window_and_refuses_an_empty_one():
    generator = torch.Generator().manual_seed(0)
    assert {draw_refl_step([7, 9], generator) for _ in range(50)} == {7, 8}
    # The window may start at the first step (the gradient through the whole sampling chain's start) ...
    assert {draw_refl_step([0, 2], generator) for _ in range(50)} == {0, 1}
    # ... but must hold a step, and no step before the first.
    for empty in ([5, 5], [6, 5], [-1, 3]):
        with pytest.raises(ValueError, match="refl_step_range"):
            draw_refl_step(empty, generator)


def test_total_loss_is_the_reward_term_plus_the_weighted_denoising_loss(fake_setup):
    image = PIL.Image.new("RGB", (16, 16), (200, 40, 90))
    regularizer = CaptionedImages([image], ["a pink square"], 16)
    results = {}
    for weight in (0.0, 2.0):
        config, components = fake_setup(pretrain_loss_weight=weight, pretrain_batch_size=1)
        reward = RecordingReward()
        loss, logs, _ = run_refl(config, components, reward, seed=3, regularizer=regularizer)
        results[weight] = (loss.item(), logs, reward, components)
    loss_0, logs_0, reward_0, _ = results[0.0]
    loss_2, logs_2, reward_2, components = results[2.0]
    reward_term = 0.5 * F.relu(-reward_2.scores.detach()).mean().item()
    # The reward part does not depend on the regulariser: same draws, same scores.
    torch.testing.assert_close(reward_0.scores, reward_2.scores)
    assert loss_0 == pytest.approx(reward_term, rel=1e-6) and "pretrain_loss" not in logs_0

    # The denoising term by hand: the last rows of the gradient call are x_s = √ᾱ_s·z + √(1−ᾱ_s)·ε.
    unet = components.unet
    (grad_call,) = [call for call in unet.calls if call["grad"]]
    noisy, s = grad_call["sample"][4:], grad_call["timestep"][4:]
    assert noisy.shape[0] == 1 and grad_call["sample"].shape[0] == 5
    caption_text = encode_prompts(components, ["a pink square"], "cpu")
    torch.testing.assert_close(grad_call["text"][4:], caption_text)
    clean = regularizer.batch([0])[0]
    z = torch.cat([F.avg_pool2d(clean, 8), F.avg_pool2d(clean, 8)[:, :1]], dim=1) * 10.0
    alpha = components.noise_scheduler.alphas_cumprod[s].view(-1, 1, 1, 1)
    noise = (noisy - alpha.sqrt() * z) / (1 - alpha).sqrt()
    with torch.no_grad():
        prediction = unet.predict(noisy, s, caption_text)
    denoising = ((prediction - noise) ** 2).mean().item()
    assert logs_2["pretrain_loss"] == pytest.approx(denoising, rel=1e-4)
    assert loss_2 == pytest.approx(reward_term + 2.0 * denoising, rel=1e-4)
    assert loss_2 - loss_0 == pytest.approx(2.0 * logs_2["pretrain_loss"], rel=1e-5)
    assert denoising > 1e-3  # the difference is not lost in rounding


def test_a_regulariser_weight_of_one_adds_the_denoising_loss_once(fake_setup):
    regularizer = CaptionedImages([PIL.Image.new("RGB", (16, 16), (200, 40, 90))], ["a pink square"], 16)
    losses = {}
    for weight in (0.0, 1.0):
        config, components = fake_setup(pretrain_loss_weight=weight, pretrain_batch_size=1)
        losses[weight] = run_refl(config, components, RecordingReward(), seed=3, regularizer=regularizer)
    (loss_0, _, _), (loss_1, logs_1, _) = losses[0.0], losses[1.0]
    assert "pretrain_loss" in logs_1 and logs_1["pretrain_loss"] > 1e-3
    assert loss_1.item() - loss_0.item() == pytest.approx(logs_1["pretrain_loss"], rel=1e-5)


def test_sampling_down_to_the_gradient_step_is_guided_too(fake_setup):
    config, components = fake_setup(guidance_scale=3.0)
    run_refl(config, components, RecordingReward(), seed=1)
    no_grad_calls = [call for call in components.unet.calls if not call["grad"]]
    assert no_grad_calls
    empty = encode_prompts(components, [""] * len(PROMPTS), "cpu")
    cond = encode_prompts(components, PROMPTS, "cpu")
    for call in no_grad_calls:
        # Every no-gradient step sees the unconditional and the conditional embeddings, as the gradient step does.
        torch.testing.assert_close(call["text"], torch.cat([empty, cond]))


def test_every_random_draw_comes_from_the_steps_generator(fake_setup):
    colours = [(200, 40, 90), (30, 200, 90), (10, 10, 240), (250, 250, 0), (90, 90, 90), (0, 120, 120)]
    regularizer = CaptionedImages([PIL.Image.new("RGB", (16, 16), c) for c in colours], list("abcdef"), 16)
    config, components = fake_setup(pretrain_loss_weight=1.0, pretrain_batch_size=2)
    results = []
    for global_seed in (0, 12345, 777, 4):
        torch.manual_seed(global_seed)  # a resumed run's global RNG is anywhere
        components.unet.calls.clear()
        loss, logs, _ = run_refl(config, components, RecordingReward(), seed=7, regularizer=regularizer)
        results.append((loss.item(), logs["pretrain_loss"], components.unet.calls[-1]["sample"]))
    for other in results[1:]:
        assert other[:2] == results[0][:2]
        assert torch.equal(other[2], results[0][2])


class FakeAttributeTerm:
    """CoMat's attribute concentration stand-in: records which rows it was given, returns a known loss."""

    def __init__(self):
        self.rows = None

    @contextlib.contextmanager
    def recording(self, unet, latent_size):
        yield {}, "recorder"

    def loss(self, recorder, rows, images, prompts):
        self.rows = rows
        return torch.tensor(0.25)


@pytest.mark.parametrize(("guidance_scale", "rows"), [(3.0, slice(2, 4)), (1.0, slice(0, 2))])
def test_attribute_concentration_reads_the_conditional_rows_and_adds_its_loss(fake_setup, guidance_scale, rows):
    config, components = fake_setup(guidance_scale=guidance_scale)
    term, reward = FakeAttributeTerm(), RecordingReward()
    loss, logs, _ = refl_loss(config, components, reward, PROMPTS, step_generator(0, 0, 0), attribute=term)
    assert term.rows == rows
    reward_term = 0.5 * F.relu(-reward.scores.detach()).mean().item()
    assert logs["attribute_concentration_loss"] == 0.25
    assert loss.item() == pytest.approx(reward_term + 0.25, rel=1e-6)
