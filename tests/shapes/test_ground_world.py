"""The grounding fine-tune of the shapes world: its losses on hand-made cases, its data, and resume."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from realign_pipeline.pipeline_realign_diff import CrossAttentionRecorder
from realign_pipeline.shapes.data import make_sample
from realign_pipeline.shapes.ground_world import (
    WORLD,
    GroundingConfig,
    GroundingData,
    blank_padding_rows,
    ground_world,
    group_boxes,
    group_masks,
    grown_box_labels,
    is_modulated_step,
    loose_region_labels,
    modulated_loss_weights,
    padding_positions,
    phrase_token_positions,
    pixel_grounding_loss,
    rows_to_blank,
    strip_labels,
    token_grounding_loss,
    training_attention_state,
    true_mask_regions,
)
from realign_pipeline.shapes.train_world import load_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(WORLD, subfolder="tokenizer")


def test_padding_starts_at_the_first_end_token():
    ids = torch.tensor([[49406, 5, 6, 49407, 49407, 49407], [49406, 49407, 49407, 49407, 49407, 49407]])
    expected = torch.tensor([[False, False, False, True, True, True], [False, True, True, True, True, True]])
    assert torch.equal(padding_positions(ids, 49407), expected)


def test_blanking_replaces_only_the_padding_of_the_chosen_rows():
    encoded = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    empty = torch.full((1, 3, 2), -1.0)
    padding = torch.tensor([[False, True, True], [False, False, True]])
    seen = blank_padding_rows(encoded, empty, padding, torch.tensor([False, True]))
    expected = encoded.clone()
    expected[1, 2] = -1.0  # row 1 is chosen; of its positions only the last is padding
    assert torch.equal(seen, expected)
    every_row = blank_padding_rows(encoded, empty, padding, torch.tensor([True, True]))
    assert torch.equal(every_row[0, 1:], empty[0, 1:]) and torch.equal(every_row[0, 0], encoded[0, 0])


def test_padding_dropout_blanks_a_random_share_of_rows_and_draws_only_when_on():
    generator = torch.Generator().manual_seed(0)
    assert rows_to_blank(GroundingConfig(), 5, generator).all()  # blank_padding: every row
    assert not rows_to_blank(GroundingConfig(blank_padding=False), 5, generator).any()
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    everyone = GroundingConfig(blank_padding=False, padding_dropout=1.0)
    assert rows_to_blank(everyone, 5, generator).all()
    half = rows_to_blank(GroundingConfig(blank_padding=False, padding_dropout=0.5), 4000, generator)
    assert 0.45 < half.float().mean() < 0.55


def test_re_weighted_batches_start_at_their_step_and_draw_only_when_they_can_be_on():
    generator = torch.Generator().manual_seed(0)
    untouched = torch.Generator().manual_seed(0).get_state()
    assert not is_modulated_step(GroundingConfig(), 0, generator)  # modulated_fraction 0: never
    late = GroundingConfig(modulated_fraction=1.0, modulated_from_step=5, steps=10)
    assert not any(is_modulated_step(late, step, generator) for step in range(5))
    assert torch.equal(generator.get_state(), untouched)  # nothing drawn before the first possible step
    assert all(is_modulated_step(late, step, generator) for step in range(5, 10))
    half = GroundingConfig(modulated_fraction=0.5, modulated_from_step=5, steps=10)
    assert 0.45 < sum(is_modulated_step(half, 5, generator) for _ in range(4000)) / 4000 < 0.55


def hand_case():
    # Four pixels, three tokens; the group owns token 1; its object covers pixels 0 and 1.
    attention = torch.tensor([[[0.2, 0.6, 0.2], [0.5, 0.3, 0.2], [0.8, 0.1, 0.1], [0.9, 0.0, 0.1]]])
    word_tokens = torch.tensor([[[False, True, False]]])
    masks = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    return attention, word_tokens, masks


def test_token_loss_is_one_minus_the_share_inside_squared():
    attention, word_tokens, masks = hand_case()
    inside = (0.6 + 0.3) / (0.6 + 0.3 + 0.1 + 0.0)
    loss = token_grounding_loss(attention, word_tokens, masks, torch.tensor([[True]]))
    assert loss.item() == pytest.approx((1 - inside) ** 2)
    # An absent group (dropped caption) contributes nothing.
    assert token_grounding_loss(attention, word_tokens, masks, torch.tensor([[False]])).item() == 0.0


def test_pixel_loss_is_the_binary_cross_entropy_of_the_words_attention_and_the_mask():
    attention, word_tokens, masks = hand_case()
    values, targets = [0.6, 0.3, 0.1, 1e-6], [1, 1, 0, 0]
    expected = np.mean([-(t * math.log(v) + (1 - t) * math.log(1 - v)) for v, t in zip(values, targets)])
    loss = pixel_grounding_loss(attention, word_tokens, masks, torch.tensor([[True]]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_a_better_grounded_map_has_lower_losses():
    attention, word_tokens, masks = hand_case()
    grounded = torch.tensor([[[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    present = torch.tensor([[True]])
    for loss in (token_grounding_loss, pixel_grounding_loss):
        assert loss(grounded, word_tokens, masks, present) < loss(attention, word_tokens, masks, present)


def test_each_group_owns_its_colour_and_shape_words(tokenizer):
    for index in range(40):
        sample = make_sample(0, index, "train")
        words = sample.scene.caption.replace(",", " ,").split()
        positions = phrase_token_positions(tokenizer, sample.scene.caption)
        assert len(positions) == len(sample.scene.spec.groups)
        for group, tokens in zip(sample.scene.spec.groups, positions):
            # One token per world word; position p is word p - 1 (0 is <|startoftext|>).
            assert [words[p - 1] for p in tokens] == [group.colour, words[tokens[1] - 1]]
            assert words[tokens[1] - 1].startswith(group.shape)


def test_group_masks_are_the_union_of_the_groups_objects_resized_by_area():
    sample = next(
        make_sample(0, i, "train") for i in range(100) if make_sample(0, i, "train").scene.category == "count"
    )
    masks = group_masks(sample, [64, 16])
    for group in range(len(sample.scene.spec.groups)):
        union = np.any([m for o, m in zip(sample.scene.objects, sample.masks) if o.group == group], axis=0)
        assert np.array_equal(masks[64][group].numpy() > 0.5, union)
        assert masks[16][group].sum().item() == pytest.approx(union.sum() / 16, rel=1e-5)


def test_the_checkpoint_holds_weights_adam_moments_ema_and_rng(tmp_path):
    config = GroundingConfig(output_dir=str(tmp_path / "run"), num_images=4, steps=1, batch_size=2, log_every=1)
    ground_world(config)
    state = load_checkpoint(tmp_path / "run-work" / "grounding.safetensors")
    assert state["step"] == 1
    unet = state["model"]
    assert any(key.startswith("0.") for key in unet) and any(key.startswith("1.") for key in unet)  # UNet, text
    assert len(state["ema"]) == len(state["optimizer"]["state"]) == len(unet)
    assert all({"exp_avg", "exp_avg_sq", "step"} <= set(moments) for moments in state["optimizer"]["state"].values())
    assert not torch.equal(state["generator"], torch.Generator().manual_seed(config.seed + 40).get_state())
    # The starting world's card is replaced by one describing this folder.
    assert "# run: the shapes world with grounded words" in (tmp_path / "run" / "README.md").read_text()


@pytest.mark.slow
def test_a_resumed_run_continues_the_uninterrupted_run(tmp_path):
    def config(name, steps):
        return GroundingConfig(
            output_dir=str(tmp_path / name), num_images=8, steps=steps, batch_size=2, checkpoint_every=1, log_every=1
        )

    ground_world(config("straight", 2))
    ground_world(config("resumed", 1))
    assert ground_world(config("resumed", 2))["resumed_from"] == 1
    straight = load_file(tmp_path / "straight-work" / "grounding.safetensors")
    resumed = load_file(tmp_path / "resumed-work" / "grounding.safetensors")
    assert set(straight) == set(resumed)
    # Same batches, noise and optimizer state; the kernels' float rounding in a fresh process differs at ~1e-9.
    for name in straight:
        assert torch.allclose(straight[name].float(), resumed[name].float(), rtol=1e-5, atol=1e-7), name
    # The grounded folder is an ordinary Stable Diffusion folder.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "resumed")
    assert pipe.unet.config.sample_size == 16


def test_a_folder_without_model_index_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=f"world {tmp_path}: not a shapes-world pipeline folder"):
        ground_world(GroundingConfig(world=str(tmp_path), output_dir=str(tmp_path / "out")))


def test_true_mask_regions_give_each_cell_to_the_group_covering_it():
    masks = torch.zeros(2, 3, 4, 4)
    masks[:, 0, :, :2] = 1.0  # group 0: left half
    masks[:, 1, :, 2:] = 0.6  # group 1: right half, more than half covered
    masks[:, 2, 0, 3] = 0.9  # group 2 covers one cell more than group 1 does
    masks[:, 1, 3, 3] = 0.4  # ... and one cell is under half covered: no region
    word_tokens = torch.zeros(2, 3, 77, dtype=torch.bool)
    word_tokens[:, 0, [2, 3]] = True
    word_tokens[:, 1, [6, 7]] = True
    data = GroundingData(torch.zeros(2, 4, 4, 4), torch.zeros(2, 77, dtype=torch.long), word_tokens, {4: masks})
    regions = true_mask_regions(data, torch.tensor([0, 1]), torch.tensor([False, True]), 4)
    expected = torch.tensor([[0, 0, 1, 2], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, -1]])
    assert torch.equal(regions.labels[0], expected)
    assert torch.equal(regions.region_tokens[0], word_tokens[0])
    # A dropped caption (trained as the empty prompt) has no regions at all.
    assert (regions.labels[1] == -1).all() and not regions.region_tokens[1].any()


def two_objects_side_by_side(side: int = 8) -> torch.Tensor:
    masks = torch.zeros(3, side, side)
    masks[0, 2:4, 1:3] = 1.0  # group 0: columns 1-2
    masks[1, 5:7, 5:7] = 1.0  # group 1: columns 5-6, rows 5-6
    return masks


def test_group_boxes_are_inclusive_and_absent_groups_have_none():
    masks = two_objects_side_by_side()
    masks[1, 4, 4] = 0.3  # touched, not covered: outside the box
    assert group_boxes(masks) == [(2, 1, 3, 2), (5, 5, 6, 6), None]
    only_touched = torch.zeros(1, 4, 4)
    only_touched[0, 1, 2] = 0.2  # a tiny object: the cells it touches
    assert group_boxes(only_touched) == [(1, 2, 1, 2)]


def test_strips_hold_each_group_and_cut_between_the_boxes():
    masks = two_objects_side_by_side()
    boxes = group_boxes(masks)
    cuts = set()
    for seed in range(40):
        labels = strip_labels(boxes, 8, 1, torch.Generator().manual_seed(seed))
        # Every row is the same: a left strip for group 0, the rest for group 1.
        assert (labels == labels[0]).all() and (labels >= 0).all()
        cut = int((labels[0] == 1).nonzero()[0])
        cuts.add(cut)
        assert (labels[:, :cut] == 0).all() and (labels[:, cut:] == 1).all()
    # The cut lies after group 0's last column (2) and at or before group 1's first (5), all positions drawn.
    assert cuts == {3, 4, 5}
    # Along rows the boxes (rows 2-3 and 5-6) also separate: top strip group 0.
    rows = strip_labels(boxes, 8, 0, torch.Generator().manual_seed(0))
    assert (rows[:3] == 0).all() and (rows[5:] == 1).all()


def test_strips_refuse_boxes_that_overlap_along_the_axis():
    masks = torch.zeros(2, 8, 8)
    masks[0, 0:2, 1:5] = 1.0
    masks[1, 6:8, 3:7] = 1.0  # columns overlap (3-4), rows do not
    boxes = group_boxes(masks)
    assert strip_labels(boxes, 8, 1, torch.Generator()) is None
    assert strip_labels(boxes, 8, 0, torch.Generator()) is not None


def test_grown_boxes_keep_objects_and_give_contested_cells_to_nobody():
    masks = two_objects_side_by_side()
    labels = grown_box_labels(masks, group_boxes(masks), torch.Generator().manual_seed(0), grow=0)
    expected = torch.full((8, 8), -1)
    expected[2:4, 1:3], expected[5:7, 5:7] = 0, 1
    assert torch.equal(labels, expected)
    # Grown by 3: the boxes meet around (4, 4); cells both claim stay unassigned, objects stay their own.
    for seed in range(10):
        labels = grown_box_labels(masks, group_boxes(masks), torch.Generator().manual_seed(seed), grow=3)
        assert (labels[2:4, 1:3] == 0).all() and (labels[5:7, 5:7] == 1).all()
        assert ((labels == 0).sum() >= 4) and ((labels == 1).sum() >= 4)
    wide = torch.zeros(2, 6, 6)
    wide[0, :, 0:3] = 1.0  # group 0 spans the left half; group 1 sits inside its grown box
    wide[1, 2, 4] = 1.0
    labels = grown_box_labels(wide, group_boxes(wide), torch.Generator().manual_seed(0), grow=3)
    assert labels[2, 4] == 1 and (labels[:, :3] == 0).all()


def test_loose_layouts_always_contain_every_object_in_its_own_region():
    masks = two_objects_side_by_side()
    generator = torch.Generator().manual_seed(1)
    kinds = set()
    for _ in range(30):
        labels = loose_region_labels(masks, generator)
        assert (labels[masks[0] >= 0.5] == 0).all() and (labels[masks[1] >= 0.5] == 1).all()
        kinds.add("strips" if (labels >= 0).all() else "boxes")
    assert kinds == {"strips", "boxes"}


def test_modulated_weights_are_min_snr_raised_to_the_capped_x0_weight():
    snr = torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0])
    # Min-SNR-5 alone: 1 below SNR 5, 5/SNR above.
    expected_min_snr = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5])
    assert torch.allclose(modulated_loss_weights(snr, 5.0, 1.0), expected_min_snr)
    # 1/SNR capped at 20: 20, 10, 2, then Min-SNR where it is larger.
    assert torch.allclose(modulated_loss_weights(snr, 5.0, 20.0), torch.tensor([20.0, 10.0, 2.0, 1.0, 0.5]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["steps=0"], "--set: steps must be"),
        (["modulated_fraction=1.5"], "--set: modulated_fraction must be"),
        (["modulated_x0_weight_cap=0.5"], "--set: modulated_x0_weight_cap must be"),
        (["modulated_self_attention_weight=-1"], "--set: modulated_self_attention_weight must be"),
        (["modulated_cross_attention_weight=nan"], "--set: modulated_cross_attention_weight must be"),
        (["token_loss_weigth=0.1"], "did you mean 'token_loss_weight'?"),
        (["world=/no/such/world"], "world /no/such/world: not a shapes-world pipeline folder"),
        (["padding_dropout=1.2", "blank_padding=false"], "--set: padding_dropout must be"),
        (["padding_dropout=0.5"], "padding_dropout 0.5: blanks the padding of some scenes when it is kept"),
        (["modulated_from_step=10"], "modulated_from_step 10: needs re-weighted batches (modulated_fraction above 0"),
        (["modulated_from_step=100", "modulated_fraction=0.5", "steps=100"], "a step before the run's last (100)"),
    ],
)
def test_realign_world_ground_refuses_bad_options_before_any_work(tmp_path, capsys, overrides, message):
    from realign_pipeline.cli import main

    output = tmp_path / "grounded"
    arguments = ["world", "ground", "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, *(item for override in overrides for item in ("--set", override))])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not output.exists() and not (tmp_path / "grounded-work").exists()


def test_training_batches_modulate_at_the_configured_weights_over_the_whole_batch():
    config = GroundingConfig(modulated_cross_attention_weight=0.7, modulated_self_attention_weight=0.2)
    recorder = CrossAttentionRecorder(keep_graph=True)
    state = training_attention_state(config, 16, recorder)
    assert (state.cross_attention_weight, state.self_attention_weight) == (0.7, 0.2)
    assert state.latent_size == (16, 16) and state.recorder is recorder
    assert not state.modulate and state.regions is None  # off until a modulated batch switches it on
    assert not state.conditional_half_only


def test_from_scratch_starts_from_a_seeded_fresh_copy_of_the_architecture():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from realign_pipeline.shapes.ground_world import fresh_models

    text_encoder = CLIPTextModel.from_pretrained(WORLD, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(WORLD, subfolder="unet")
    first_text, first_unet = fresh_models(text_encoder.config, unet.config, seed=3)
    second_text, second_unet = fresh_models(text_encoder.config, unet.config, seed=3)
    other_text, _ = fresh_models(text_encoder.config, unet.config, seed=4)
    assert first_unet.config == unet.config and first_text.config.to_dict() == text_encoder.config.to_dict()
    world_weights, fresh_weights = unet.state_dict(), first_unet.state_dict()
    assert set(world_weights) == set(fresh_weights)
    assert not torch.equal(world_weights["conv_in.weight"].float(), fresh_weights["conv_in.weight"])
    assert all(torch.equal(value, second_unet.state_dict()[name]) for name, value in fresh_weights.items())
    assert all(torch.equal(value, second_text.state_dict()[name]) for name, value in first_text.state_dict().items())
    assert not torch.equal(
        first_text.get_input_embeddings().weight,
        other_text.get_input_embeddings().weight,
    )
    assert all(param.dtype == torch.float32 for param in first_unet.parameters())


def test_the_card_command_repeats_the_run_through_the_real_command_line(tmp_path):
    import shlex

    from realign_pipeline.cli import build_parser
    from realign_pipeline.shapes.command import _config_with_output
    from realign_pipeline.shapes.ground_world import grounding_command

    config = GroundingConfig(
        output_dir=str(tmp_path / "g"), steps=10, blank_padding=False, from_scratch=True, learning_rate=1e-3
    )
    command = grounding_command(config)
    assert command == (
        f"realign world ground --output {tmp_path / 'g'} --set steps=10 --set learning_rate=0.001 "
        "--set blank_padding=false --set from_scratch=true"
    )
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert _config_with_output(GroundingConfig, args) == config
    assert grounding_command(GroundingConfig(output_dir="x")) == "realign world ground --output x"


def test_the_grounded_card_says_how_the_folder_was_made(tmp_path):
    from realign_pipeline.shapes.ground_world import write_grounded_card

    config = GroundingConfig(
        output_dir=str(tmp_path / "gw"), steps=7, from_scratch=True, modulated_fraction=0.5, token_loss_weight=0.2
    )
    (tmp_path / "gw" / "unet").mkdir(parents=True)
    (tmp_path / "gw" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 2_000_000)
    info = {"steps": 7, "seconds_this_run": 90.0, "last_losses": {"step": 7, "denoising": 0.0123, "token": 0.5}}
    card = write_grounded_card(config, info).read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert "# gw: the shapes world with grounded words" in card
    assert "were trained from a fresh initialisation" in card
    assert f"realign world ground --output {tmp_path / 'gw'} --set steps=7 --set token_loss_weight=0.2" in card
    assert "7 optimizer steps of batch 32" in card and "1.5 min" in card
    assert "token loss (arXiv 2312.03626, Eq. 3), weight 0.2" in card
    assert "re-weighting on in 50% of batches (cross-attention weight 1.0, self-attention weight 0.3," in card
    later = GroundingConfig(output_dir=str(tmp_path / "gw"), steps=9, modulated_fraction=0.5, modulated_from_step=4)
    later_card = write_grounded_card(later, info).read_text()
    assert "re-weighting on in 50% of batches from step 4 (cross-attention weight 1.0," in later_card
    assert "**Trained with re-weighting on.**" in card
    assert "denoising 0.0123, token 0.5" in card
    assert "- `unet/diffusion_pytorch_model.safetensors`: 2.00 MB" in card
    fine_tuned = GroundingConfig(output_dir=str(tmp_path / "gw"), blank_padding=False)
    card = write_grounded_card(fine_tuned, {"steps": 1, "seconds_this_run": 6.0}).read_text()
    assert "fine-tuned from `realign_pipeline/shapes/world (the built-in world)`" in card and "padding kept" in card
    assert "re-weighting on" not in card and "none logged" in card
    dropout = GroundingConfig(output_dir=str(tmp_path / "gw"), blank_padding=False, padding_dropout=0.25)
    card = write_grounded_card(dropout, {"steps": 1, "seconds_this_run": 6.0}).read_text()
    assert "padding kept, but blanked (the empty prompt's encodings) in a random 25% of the scenes" in card
    assert str(Path(fine_tuned.world).resolve()) not in card  # no absolute path of this machine
    elsewhere = GroundingConfig(output_dir=str(tmp_path / "gw"), world="outputs/gw8")
    card = write_grounded_card(elsewhere, {"steps": 1, "seconds_this_run": 6.0}).read_text()
    assert "fine-tuned from `outputs/gw8`" in card and '"world": "outputs/gw8"' in card


def test_stop_after_steps_checkpoints_and_exports_part_way(tmp_path):
    config = GroundingConfig(
        output_dir=str(tmp_path / "run"), num_images=4, steps=3, stop_after_steps=1, batch_size=2, log_every=1
    )
    assert ground_world(config)["steps"] == 1
    assert load_checkpoint(tmp_path / "run-work" / "grounding.safetensors")["step"] == 1
    card = (tmp_path / "run" / "README.md").read_text()
    assert "1 optimizer steps" in card and "--set stop_after_steps=1" in card
    # Run again with a checkpoint already at the stop: it is exported as it is, without training.
    again = ground_world(config)
    assert again["steps"] == 1 and again["resumed_from"] == 1


def test_prompt_length_pads_to_fewer_tokens_and_the_folder_keeps_it(tmp_path):
    from diffusers import StableDiffusionPipeline

    config = GroundingConfig(output_dir=str(tmp_path / "run"), num_images=4, steps=1, batch_size=2, prompt_length=16)
    ground_world(config)
    cached = load_file(tmp_path / "run-work" / "data-n4-s0-t16.safetensors")
    assert cached["ids"].shape == (4, 16) and cached["word_tokens"].shape[-1] == 16
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.tokenizer.model_max_length == 16
    prompt_embeds, _ = pipe.encode_prompt("a red circle", "cpu", 1, False)
    assert prompt_embeds.shape[1] == 16
    assert "- prompts padded to 16 tokens" in (tmp_path / "run" / "README.md").read_text()


@pytest.mark.parametrize(
    "prompt_length, message",
    [(5, "prompt_length 5: the training caption .* takes [0-9]+ tokens"), (78, "only 77 positions")],
)
def test_a_prompt_length_that_cannot_hold_the_prompts_is_refused_before_training(tmp_path, prompt_length, message):
    config = GroundingConfig(output_dir=str(tmp_path / "run"), num_images=4, steps=1, prompt_length=prompt_length)
    with pytest.raises(ValueError, match=message):
        ground_world(config)
    assert not (tmp_path / "run-work" / "grounding.safetensors").exists()
