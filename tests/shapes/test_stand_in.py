"""The stand-in measurements: token positions, judge masks, the blanked encodings and one small probe run."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from realign_pipeline.shapes.data import make_sample
from realign_pipeline.shapes.ground_world import WORLD, phrase_token_positions
from realign_pipeline.shapes.stand_in import (
    blanked_padding_embeddings,
    blanked_word_embeddings,
    iou,
    judge_masks,
    probe_world,
)


@pytest.fixture(scope="module")
def world():
    pipe = StableDiffusionPipeline.from_pretrained(WORLD, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_phrase_word_positions_are_the_colour_and_shape_tokens(world):
    # <|startoftext|> a red circle on the left of two blue squares: one token per word.
    assert phrase_token_positions(world.tokenizer, "a red circle on the left of two blue squares") == [[2, 3], [9, 10]]
    # The same phrase twice is not possible in the world; the same colour in two phrases is.
    assert phrase_token_positions(world.tokenizer, "a red circle and a red square") == [[2, 3], [6, 7]]


def test_iou_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, np.zeros((4, 4), bool)) == 0.0


def test_covered_share_is_precision_one_way_and_recall_the_other():
    from realign_pipeline.shapes.stand_in import covered_share

    predicted = np.zeros((4, 4), bool)
    true = np.zeros((4, 4), bool)
    predicted[:2] = True  # 8 pixels
    true[1, :2] = True  # 2 pixels, both inside the prediction
    assert covered_share(predicted, true) == pytest.approx(2 / 8)
    assert covered_share(true, predicted) == 1.0
    assert covered_share(np.zeros((4, 4), bool), true) == 0.0


def test_attention_split_by_hand():
    from realign_pipeline.shapes.stand_in import attention_split

    # Tokens: <|startoftext|>, red, circle, blue, <|endoftext|>, padding, padding; a 1×2 grid.
    maps = torch.tensor([[[0.1, 0.2, 0.1, 0.1, 0.2, 0.2, 0.1], [0.3, 0.0, 0.0, 0.3, 0.1, 0.1, 0.2]]])
    split = attention_split(maps, torch.tensor([[1.0, 0.0]]), own=[1, 2], end=4)
    assert split == pytest.approx({"own_words": 0.3, "other_words": 0.1, "start": 0.1, "end": 0.2, "padding": 0.3})
    # Half of each cell: the two pixels' rows averaged.
    split = attention_split(maps, torch.tensor([[0.5, 0.5]]), own=[3], end=4)
    assert split == pytest.approx({"own_words": 0.2, "other_words": 0.15, "start": 0.2, "end": 0.15, "padding": 0.3})


def test_judge_masks_find_the_rendered_objects():
    for index in range(30):
        sample = make_sample(3, index, "train")
        masks = judge_masks(sample.image, sample.scene.caption)
        for group, mask in enumerate(masks):
            truth = np.any([m for o, m in zip(sample.scene.objects, sample.masks) if o.group == group], axis=0)
            assert mask is not None and iou(mask, truth) > 0.7


@torch.no_grad()
def test_blanked_encodings_replace_exactly_the_word_positions(world):
    prompts = ["a red circle and a blue square", "two green triangles"]
    blanked, empty = blanked_word_embeddings(world, prompts)
    ids = world.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoded = world.text_encoder(ids)[0]
    for row, num_words in enumerate((7, 3)):
        words = slice(1, 1 + num_words)
        assert torch.equal(blanked[row, words], empty[row, words])
        assert torch.equal(blanked[row, 0], encoded[row, 0])
        assert torch.equal(blanked[row, 1 + num_words :], encoded[row, 1 + num_words :])
        assert not torch.allclose(encoded[row, words], empty[row, words])


@torch.no_grad()
def test_words_only_encodings_blank_exactly_the_end_token_and_the_padding(world):
    prompts = ["a red circle and a blue square", "two green triangles"]
    words_only = blanked_padding_embeddings(world, prompts)
    _, empty = blanked_word_embeddings(world, prompts)
    ids = world.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoded = world.text_encoder(ids)[0]
    for row, num_words in enumerate((7, 3)):
        end = 1 + num_words
        assert torch.equal(words_only[row, :end], encoded[row, :end])
        assert torch.equal(words_only[row, end:], empty[row, end:])
        assert not torch.allclose(encoded[row, end:], empty[row, end:])


def test_probe_measures_every_named_object(world):
    prompts = ["a red circle and a blue square", "a white square above a purple circle"]
    result = probe_world(world, prompts, seeds=[0], num_inference_steps=4)
    summary = result.summary()
    assert result.objects_named == 4
    assert len(result.inside_share) == len(result.word_mass) == len(result.attention_mask_iou) == result.objects_found
    per_object = [
        result.attention_mask_iou,
        result.attention_mask_precision,
        result.attention_mask_recall,
        result.attention_mask_iou_all_steps,
    ]
    assert all(len(values) == result.objects_found for values in per_object)
    assert all(0.0 <= value <= 1.0 for value in result.inside_share + sum(per_object, []))
    # An IoU is at most the smaller of the mask's precision and recall.
    for score, precision, recall in zip(*per_object[:3]):
        assert score <= min(precision, recall) + 1e-9
    assert result.objects_found > 0
    # Attention rows sum to 1, so the split's shares add up to 1 and its own-word share is the word mass.
    split = result.attention_split
    assert all(len(split[key]) == result.objects_found for key in split)
    for index, mass in enumerate(result.word_mass):
        assert sum(split[key][index] for key in split) == pytest.approx(1.0, abs=1e-5)
        assert split["own_words"][index] == pytest.approx(mass, rel=1e-4)
    assert set(summary["object_attention_split"]) == {"own_words", "other_words", "start", "end", "padding"}
    # Four named colours per condition, one seed.
    assert all(len(values) == 4 for values in result.colour_present.values())
    assert all(len(values) == 4 for values in result.object_present.values())
    assert set(summary["named_object_present"]) == {"prompt", "blanked", "words only", "empty"}
    # The prompts name four different colours, one object each: an object drawn is its colour drawn.
    for key, objects in result.object_present.items():
        assert sum(objects) <= sum(result.colour_present[key])
    assert set(summary["named_colour_present"]) == {"prompt", "blanked", "words only", "empty"}


def test_a_coarse_pass_run_to_the_end_makes_the_all_step_masks(world):
    # With the coarse pass over every step, the pipeline's own masks are the all-step masks: the two IoUs agree
    # object by object. (Over the first 30% they come from other maps; see the probe's report.)
    prompts = ["a red circle and a blue square", "a white square above a purple circle"]
    result = probe_world(world, prompts, seeds=[0, 1], num_inference_steps=8, coarse_stop_fraction=1.0)
    assert max(result.attention_mask_iou_all_steps) > 0  # some mask overlaps its object, or equality says little
    assert result.attention_mask_iou == result.attention_mask_iou_all_steps


def test_realign_world_probe_prints_the_three_measurements(capsys):
    import json

    from realign_pipeline.cli import main

    main(["world", "probe", "--prompts-per-category", "1", "--seeds", "1", "--split", "held_out"])
    report = json.loads(capsys.readouterr().out)
    # One binding and one relation prompt, two objects each.
    assert report["prompts"] == 2 and report["objects_named"] == 4 and report["split"] == "held_out"
    assert 0.0 <= report["inside_share"] <= 1.0 and 0.0 <= report["word_mass"] <= 1.0
    assert set(report["named_colour_present"]) == {"prompt", "blanked", "words only", "empty"}


def test_realign_world_probe_names_a_folder_that_is_no_world(tmp_path, capsys):
    from realign_pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["world", "probe", "--world", str(tmp_path)])
    assert (
        exit_info.value.code == 2 and f"--world {tmp_path}: not a diffusers pipeline folder" in capsys.readouterr().err
    )
