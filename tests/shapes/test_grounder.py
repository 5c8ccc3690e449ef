"""The shapes grounder finds each caption's shapes in rendered scenes and falls back like a detector would."""

import numpy as np
import pytest

from realign_pipeline.pipeline_realign_diff import Grounder
from realign_pipeline.shapes.data import (
    ObjectGroup,
    PromptSpec,
    Scene,
    ShapeObject,
    make_sample,
    phrase_for,
    render_scene,
)
from realign_pipeline.shapes.grounder import ShapesGrounder


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_is_a_grounder():
    assert isinstance(ShapesGrounder(), Grounder)


@pytest.mark.parametrize("index", range(40))
def test_masks_match_the_true_masks_of_rendered_scenes(index):
    sample = make_sample(5, index, "all")
    groups = sample.scene.spec.groups
    captions = [phrase_for(group) for group in groups]
    masks = ShapesGrounder()(sample.image, captions)
    for group_index, mask in enumerate(masks):
        truth = np.logical_or.reduce(
            [m for m, obj in zip(sample.masks, sample.scene.objects) if obj.group == group_index]
        )
        assert mask is not None, captions[group_index]
        assert iou(mask, truth) > 0.8, (captions[group_index], iou(mask, truth))


def scene(*objects: ShapeObject) -> Scene:
    spec = PromptSpec(tuple(ObjectGroup(o.colour, o.shape) for o in objects))
    return Scene(spec, objects, "")


def test_a_missing_pairing_takes_the_closest_shape_colour_first():
    image, masks = render_scene(
        scene(ShapeObject("red", "square", (4, 4, 22, 22)), ShapeObject("blue", "circle", (36, 36, 56, 56)))
    )
    red_circle, green_circle, purple_triangle = ShapesGrounder()(
        image, ["a red circle", "a green circle", "a purple triangle"]
    )
    assert iou(red_circle, masks[0]) > 0.9  # the red square: same colour
    assert iou(green_circle, masks[1]) > 0.9  # the blue circle: same shape
    assert purple_triangle is None  # nothing left that shares a word


def test_each_shape_goes_to_one_caption_and_counts_take_several():
    image, masks = render_scene(
        scene(
            ShapeObject("red", "circle", (4, 4, 20, 20)),
            ShapeObject("red", "circle", (40, 4, 56, 20)),
            ShapeObject("red", "square", (20, 40, 38, 58)),
        )
    )
    two_circles, square = ShapesGrounder()(image, ["two red circles", "a red square"])
    assert iou(two_circles, masks[0] | masks[1]) > 0.9
    assert iou(square, masks[2]) > 0.9


def test_captions_outside_the_world_get_none():
    sample = make_sample(5, 0, "all")
    assert ShapesGrounder()(sample.image, ["a shiny red car", "a red circle above a blue square"]) == [None, None]
