import pytest
import torch
from PIL import Image

from realign_pipeline.training import PromptSampler, read_prompts, step_generator
from realign_pipeline.training.data import load_captioned_images, write_captioned_images


def test_read_prompts_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red book\n\n# a comment\n  a blue car  \n")
    assert read_prompts(path) == ["a red book", "a blue car"]


def test_processes_see_different_prompts_and_an_epoch_sees_them_all():
    prompts = [f"prompt {i}" for i in range(12)]
    samplers = [PromptSampler(prompts, batch_size=3, num_processes=2, process_index=p, seed=5) for p in range(2)]
    seen = []
    for step in range(2):  # 2 steps x 2 processes x 3 prompts = one epoch
        batches = [sampler.batch(step) for sampler in samplers]
        assert not set(batches[0]) & set(batches[1])
        seen += batches[0] + batches[1]
    assert sorted(seen) == sorted(prompts)
    # A pure function of the step: a fresh sampler (a resumed run) draws the same batch.
    assert PromptSampler(prompts, 3, 2, 1, seed=5).batch(7) == samplers[1].batch(7)


def test_step_generator_depends_only_on_its_coordinates():
    a = torch.randn(3, generator=step_generator(0, 4, 1))
    assert torch.equal(a, torch.randn(3, generator=step_generator(0, 4, 1)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(0, 4, 0)))


def test_captioned_images_round_trip(tmp_path):
    images = [Image.new("RGB", (80, 40), "red"), Image.new("RGB", (40, 80), "blue")]
    write_captioned_images(tmp_path / "pairs", images, ["a red thing", "a blue thing"])
    pairs = load_captioned_images(tmp_path / "pairs", resolution=32)
    batch, captions = pairs.batch([0, 1])
    assert batch.shape == (2, 3, 32, 32) and captions == ["a red thing", "a blue thing"]
    assert batch[0, 0].mean() > 0.9 and batch[1, 2].mean() > 0.9


def test_a_global_batch_never_straddles_two_epochs():
    # 6 prompts in global batches of 2 × 2: each epoch is one whole global batch and 2 prompts sit
    # out (a different 2 each epoch); a batch cut across two epochs would repeat prompts.
    prompts = [f"prompt {i}" for i in range(6)]
    samplers = [PromptSampler(prompts, batch_size=2, num_processes=2, process_index=p, seed=1) for p in range(2)]
    left_out = set()
    for step in range(60):
        first, second = samplers[0].batch(step), samplers[1].batch(step)
        assert len(set(first + second)) == 4, f"step {step}: {first} {second}"
        left_out |= set(prompts) - set(first + second)
        # A pure function of the step: a fresh sampler (a resumed run) draws the same batch.
        assert PromptSampler(prompts, 2, 2, 1, seed=1).batch(step) == second
    assert left_out == set(prompts)  # every prompt is trained on in some epochs


def test_whole_epochs_keep_the_order_they_always_had():
    # 12 prompts, global batch 6: nothing left out; epoch e is the permutation seeded by seed·1_000_003 + e.
    import random

    prompts = [f"prompt {i}" for i in range(12)]
    for epoch in (0, 1):
        order = list(range(12))
        random.Random(5 * 1_000_003 + epoch).shuffle(order)
        expected = [prompts[i] for i in order]
        samplers = [PromptSampler(prompts, 3, 2, q, 5) for q in range(2)]
        drawn = [p for step in (2 * epoch, 2 * epoch + 1) for sampler in samplers for p in sampler.batch(step)]
        assert drawn == expected


def test_prompt_sampler_refuses_fewer_prompts_than_a_global_batch():
    with pytest.raises(ValueError, match="batch_size × num_processes = 4"):
        PromptSampler(["a", "b", "c"], batch_size=2, num_processes=2)
    with pytest.raises(ValueError, match="process_index"):
        PromptSampler(["a", "b"], batch_size=1, num_processes=2, process_index=2)
