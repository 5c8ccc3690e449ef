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
