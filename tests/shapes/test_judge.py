"""The rule-based judge agrees with the renderer's ground truth and rejects wrong prompts."""

import dataclasses

import numpy as np
import PIL.ImageFilter
import pytest

from realign_pipeline.shapes.data import (
    COLOURS,
    SHAPES,
    ObjectGroup,
    PromptSpec,
    RelationSpec,
    make_sample,
    parse_prompt,
    render_scene,
    scene_for_prompt,
)
from realign_pipeline.shapes.judge import Detection, detect, evaluate, judge, named_object_masks

NUM_SAMPLES = 300


@pytest.fixture(scope="module")
def samples():
    return [make_sample(11, index, "all") for index in range(NUM_SAMPLES)]


def wrong_specs(spec: PromptSpec, rng: np.random.Generator) -> list[PromptSpec]:
    """Prompts that the sample's image must fail: a wrong colour, a wrong shape, a wrong count, a wrong relation."""
    groups = list(spec.groups)
    k = int(rng.integers(len(groups)))
    taken = set(spec.pairs)
    colour = next((c for c in rng.permutation(COLOURS) if (c, groups[k].shape) not in taken), None)
    shape = next((s for s in rng.permutation(SHAPES) if (groups[k].colour, s) not in taken), None)
    wrong = []
    for change in ({"colour": colour}, {"shape": shape}):
        if None not in change.values():
            changed = dataclasses.replace(groups[k], **change)
            wrong.append(dataclasses.replace(spec, groups=tuple(groups[:k] + [changed] + groups[k + 1 :])))
    if groups[k].count < 3:
        more = dataclasses.replace(groups[k], count=groups[k].count + 1)
        wrong.append(dataclasses.replace(spec, groups=tuple(groups[:k] + [more] + groups[k + 1 :])))
    if spec.relation is not None:
        opposite = {"on the left of": "on the right of", "above": "below"}
        opposite.update({v: k for k, v in opposite.items()})
        wrong.append(
            dataclasses.replace(
                spec, relation=dataclasses.replace(spec.relation, predicate=opposite[spec.relation.predicate])
            )
        )
    return wrong


def test_judge_agrees_with_ground_truth(samples):
    rng = np.random.default_rng(0)
    agree = total = 0
    for sample in samples:
        detections = detect(sample.image)  # once per image; every prompt is then scored on the same detections
        verdict = evaluate(detections, sample.scene.spec)
        found = sorted((d.colour, d.shape) for d in verdict.detections)
        truth = sorted((o.colour, o.shape) for o in sample.scene.objects)
        agree += verdict.passed and found == truth
        total += 1
        for spec in wrong_specs(sample.scene.spec, rng):
            agree += not evaluate(detections, spec).passed
            total += 1
    assert total > 3 * NUM_SAMPLES
    assert agree / total >= 0.98, agree / total


def test_detections_match_true_boxes(samples):
    for sample in samples[:100]:
        detections = detect(sample.image)
        for obj in sample.scene.objects:
            best = min(detections, key=lambda d: np.abs(np.subtract(d.bbox, obj.bbox)).sum())
            assert (best.colour, best.shape) == (obj.colour, obj.shape)
            assert np.abs(np.subtract(best.bbox, obj.bbox)).max() <= 2


def test_negative_cases_fail_for_the_right_reason():
    spec = PromptSpec(
        (ObjectGroup("red", "circle"), ObjectGroup("blue", "square")), RelationSpec(0, "on the left of", 1)
    )
    scene = scene_for_prompt(spec, np.random.default_rng(1))
    image, _ = render_scene(scene)
    assert judge(image, spec).passed
    assert judge(image, "a red circle and a blue square").passed
    wrong_colour = judge(image, "a green circle and a blue square")
    assert wrong_colour.objects_present and not wrong_colour.binding_correct and not wrong_colour.passed
    missing_shape = judge(image, "a red circle and a blue triangle")
    assert not missing_shape.objects_present and not missing_shape.passed
    too_few = judge(image, "two red circles and a blue square")
    assert too_few.binding_correct and not too_few.count_correct and not too_few.passed
    extra = judge(image, "a red circle")
    assert extra.binding_correct and not extra.count_correct and not extra.passed
    swapped = judge(image, "a red circle on the right of a blue square")
    assert swapped.binding_correct and swapped.relation_correct is False and not swapped.passed
    blank = judge(np.zeros((64, 64, 3), dtype=np.uint8), spec)
    assert not blank.passed and blank.detections == []


def test_judge_tolerates_blur_noise_and_other_sizes(samples):
    rng = np.random.default_rng(0)
    passed = []
    for sample in samples[:100]:
        blurred = np.asarray(sample.image.filter(PIL.ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255) / 255.0  # float input in [0, 1]
        passed.append(judge(noisy, sample.scene.caption).passed)
    assert np.mean(passed) >= 0.95
    big = samples[0].image.resize((128, 128))
    assert judge(big, samples[0].scene.caption).passed


def test_verdict_fields_and_prompt_spec_input(samples):
    sample = next(s for s in samples if s.scene.spec.relation is not None)
    verdict = judge(sample.image, sample.scene.spec)
    assert verdict.prompt == sample.scene.caption and verdict.relation_correct is True
    summary = verdict.as_dict()
    assert set(summary) >= {"objects_present", "binding_correct", "count_correct", "relation_correct", "passed"}
    assert judge(sample.image, parse_prompt(sample.scene.caption)).passed


def test_named_object_masks_unite_each_groups_matches_and_skip_near_misses():
    def detection(colour: str, shape: str, column: int) -> Detection:
        mask = np.zeros((4, 4), dtype=bool)
        mask[0, column] = True
        return Detection(colour, shape, (column, 0, column + 1, 1), 1, (column + 0.5, 0.5), mask)

    found = [
        detection("red", "circle", 0),
        detection("red", "circle", 2),
        detection("red", "square", 1),  # right colour, wrong shape: not the red circle
        detection("blue", "circle", 3),  # right shape, wrong colour
    ]
    red_circles, blue_squares = named_object_masks(found, "two red circles and a blue square")
    assert red_circles.tolist() == [[True, False, True, False]] + [[False] * 4] * 3
    assert blue_squares is None
