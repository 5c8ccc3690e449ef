"""Grounded-SAM through transformers: tiny random Grounding DINO and SAM loaded like Hub checkpoints."""

import importlib.util
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from realign_pipeline import Grounder
from realign_pipeline.grounding import (
    GroundedSamGrounder,
    SegmentAnythingBoxSegmenter,
    best_box_per_caption,
    build_groundingdino_py_model,
    caption_token_positions,
    detection_prompt,
    load_weights_only_checkpoint,
)

CAPTIONS = ["a red car", "a blue car", "the green book"]


def coarse_image(width=80, height=60):
    """A small non-square image with some structure, so boxes and masks map back to a known size."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (200, 30, 30)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def grounder(tiny_grounding_dino_folder, tiny_sam_folder):
    return GroundedSamGrounder.from_pretrained(
        detector=tiny_grounding_dino_folder,
        segmenter=tiny_sam_folder,
        device="cpu",
        box_threshold=0.0,
        text_threshold=0.0,
    )


class ForwardCounter:
    """Counts a module's forward calls through a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.calls += 1

    def remove(self):
        self.handle.remove()


def test_one_mask_per_caption_of_image_size_when_thresholds_are_zero(grounder):
    assert isinstance(grounder, Grounder)
    assert grounder.name == "grounding-dino+sam"
    image = coarse_image()
    masks = grounder(image, CAPTIONS)
    assert len(masks) == len(CAPTIONS)
    for mask in masks:
        assert isinstance(mask, torch.Tensor)
        assert mask.dtype == torch.bool
        assert tuple(mask.shape) == (image.height, image.width)
        assert mask.any()


def test_thresholds_above_one_find_nothing_and_never_run_sam(grounder):
    image = coarse_image()
    for attribute in ("box_threshold", "text_threshold"):
        original = getattr(grounder.detector, attribute)
        setattr(grounder.detector, attribute, 1.01)
        counter = ForwardCounter(grounder.segmenter.model)
        try:
            assert grounder(image, CAPTIONS) == [None] * len(CAPTIONS)
        finally:
            counter.remove()
            setattr(grounder.detector, attribute, original)
        assert counter.calls == 0


def test_detector_and_sam_each_run_once_for_all_captions(grounder):
    detector_counter = ForwardCounter(grounder.detector.model)
    sam_counter = ForwardCounter(grounder.segmenter.model)
    try:
        results = grounder.ground(coarse_image(), CAPTIONS)
    finally:
        detector_counter.remove()
        sam_counter.remove()
    assert (detector_counter.calls, sam_counter.calls) == (1, 1)
    assert [r.caption for r in results] == CAPTIONS
    for result in results:
        x0, y0, x1, y1 = result.box
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 60
        assert 0.0 <= result.score <= 1.0


def test_no_captions_and_wordless_captions(grounder):
    assert grounder(coarse_image(), []) == []
    masks = grounder(coarse_image(), ["...", "a red car"])
    assert masks[0] is None and masks[1] is not None


def test_captions_beyond_the_text_length_are_split_into_more_prompts(grounder):
    # max_text_len is 32 in the tiny model: 12 three-token captions (with their full stops, 4 tokens each)
    # need two prompts, and the captions must still come back in order, one mask each.
    captions = ["a red car", "a blue dog", "the green book"] * 4
    counter = ForwardCounter(grounder.detector.model)
    try:
        masks = grounder(coarse_image(), captions)
    finally:
        counter.remove()
    assert counter.calls == 2
    assert len(masks) == len(captions) and all(m is not None for m in masks)


def test_mapping_back_uses_token_positions_not_label_strings():
    text, spans = detection_prompt(["A Red car.", "a blue car", "   ", "a red car?"])
    assert text == "a red car. a blue car. a red car."
    assert spans[2] is None
    # Offsets of a word-level tokenizer for that text: [CLS] a red car . a blue car . a red car . [SEP]
    words, offsets, position = text.replace(".", " .").split(), [(0, 0)], 0
    for word in words:
        start = text.index(word, position)
        offsets.append((start, start + len(word)))
        position = start + len(word)
    offsets.append((0, 0))
    positions = caption_token_positions(offsets, spans)
    assert positions == [[1, 2, 3], [5, 6, 7], [], [9, 10, 11]]

    # Query 0 matches "a blue car" (its colour token), query 1 the last "a red car".
    probabilities = torch.full((3, 13), 0.05)
    probabilities[0, 6] = 0.9
    probabilities[1, 11] = 0.8
    probabilities[2, 3] = 0.5
    boxes = torch.zeros(3, 4)
    picks = best_box_per_caption(probabilities, boxes, positions, box_threshold=0.3, text_threshold=0.25)
    assert picks[0] == (2, pytest.approx(0.5))
    assert picks[1] == (0, pytest.approx(0.9))
    assert picks[2] is None
    assert picks[3] == (1, pytest.approx(0.8))
    # The box threshold applies to a query's best token anywhere, the text threshold to the caption's tokens.
    picks = best_box_per_caption(probabilities, boxes, positions, box_threshold=0.6, text_threshold=0.25)
    assert picks == [None, (0, pytest.approx(0.9)), None, (1, pytest.approx(0.8))]


def test_grounded_masks_become_regions_with_the_grounder_as_source(grounder, toy_pipeline_folder):
    from realign_pipeline import RealignDiffPipeline

    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red book and a yellow vase",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        grounder=grounder,
    )
    sources = {region.caption: region.source for region in out.layouts[0].regions}
    assert sources == {"a red book": "grounding-dino+sam", "a yellow vase": "grounding-dino+sam"}


@pytest.mark.skipif(importlib.util.find_spec("segment_anything") is not None, reason="segment-anything is installed")
def test_missing_segment_anything_names_the_extra(tmp_path):
    with pytest.raises(ImportError, match=r'pip install "realign-pipeline\[sam\]"'):
        SegmentAnythingBoxSegmenter.from_checkpoint(tmp_path / "sam_vit_b.pth", model_type="vit_b")


@pytest.mark.skipif(importlib.util.find_spec("groundingdino") is not None, reason="groundingdino-py is installed")
def test_missing_groundingdino_py_names_the_extra(tmp_path):
    with pytest.raises(ImportError, match=r'pip install "realign-pipeline\[groundingdino\]"'):
        build_groundingdino_py_model(tmp_path / "GroundingDINO_SwinT_OGC.py", tmp_path / "groundingdino_swint_ogc.pth")


class NotATensor:
    """Stands for anything a pickle could construct besides tensors."""


def test_checkpoints_are_read_with_weights_only(tmp_path):
    path = tmp_path / "state.pth"
    torch.save({"model": {"weight": torch.ones(2)}}, path)
    assert torch.equal(load_weights_only_checkpoint(path)["weight"], torch.ones(2))
    torch.save({"weight": torch.ones(2), "payload": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only_checkpoint(path)


@pytest.mark.parametrize(("width", "model_type"), [(768, "vit_b"), (1024, "vit_l"), (1280, "vit_h")])
def test_sam_model_type_is_read_from_the_image_encoders_width(width, model_type):
    from realign_pipeline.grounding.segment_anything_backend import PATCH_EMBEDDING, sam_model_type_of

    assert sam_model_type_of({PATCH_EMBEDDING: torch.zeros(width, 3, 16, 16)}) == model_type


def test_a_state_dict_of_no_sam_model_is_named():
    from realign_pipeline.grounding.segment_anything_backend import PATCH_EMBEDDING, sam_model_type_of

    with pytest.raises(ValueError, match="width 512 matches no registry model"):
        sam_model_type_of({PATCH_EMBEDDING: torch.zeros(512, 3, 16, 16)})
    with pytest.raises(ValueError, match="not a segment-anything checkpoint"):
        sam_model_type_of({"weight": torch.zeros(2)})


def test_a_bad_sam_model_type_is_refused_before_any_model_loads(tmp_path):
    from realign_pipeline.grounding.factory import load_grounder

    with pytest.raises(ValueError, match="`sam_model_type` must be one of"):
        load_grounder("segment-anything", sam_checkpoint=tmp_path / "missing.pth", sam_model_type="vit_x")
