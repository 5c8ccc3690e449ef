"""The original research backends: segment-anything's SAM and groundingdino-py's Grounding DINO.

Both import torchvision, so these tests run only in the second environment (``.venv-vision``, built by
``scripts/make_vision_env.sh``) with ``pytest -m vision``. Every import of those packages happens inside the
tests, so the main environment collects this file without importing them.
"""

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel

from realign_pipeline.grounding import (
    GroundedSamGrounder,
    GroundingDinoBoxDetector,
    SamBoxSegmenter,
    SegmentAnythingBoxSegmenter,
)

pytestmark = pytest.mark.vision

# Skipped, not failed, under a plain `pytest` in the main environment; scripts/make_vision_env.sh checks that
# these packages import, so they are never missing in the vision environment.
NEEDS_VISION_ENV = "needs the vision environment: bash scripts/make_vision_env.sh"

CAPTIONS = ["a red car", "a blue dog", "the green book"]

# groundingdino-py's Swin-T config with one encoder and one decoder layer and 10 queries. The hidden size stays
# 256: the text side's sine position embedding is 256 wide whatever the config says.
GROUNDINGDINO_CONFIG = """
batch_size = 1
modelname = "groundingdino"
backbone = "swin_T_224_1k"
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [1, 2, 3]
backbone_freeze_keywords = None
enc_layers = 1
dec_layers = 1
pre_norm = False
dim_feedforward = 32
hidden_dim = 256
dropout = 0.0
nheads = 8
num_queries = 10
query_dim = 4
num_patterns = 0
num_feature_levels = 4
enc_n_points = 2
dec_n_points = 2
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
dn_label_coef = 1.0
dn_bbox_coef = 1.0
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = "{text_encoder}"
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = False
use_transformer_ckpt = False
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.1
sub_sentence_present = True
"""


def coarse_image(width=96, height=72):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (200, 30, 30)
    return Image.fromarray(pixels)


class ForwardCounter:
    """Counts a module's forward calls through a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.calls += 1

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def segment_anything_checkpoint(tmp_path_factory):
    """segment-anything's smallest registry model (ViT-B) with random weights, saved as a state dict."""
    sam_model_registry = pytest.importorskip("segment_anything", reason=NEEDS_VISION_ENV).sam_model_registry

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("segment-anything") / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def segment_anything_segmenter(segment_anything_checkpoint):
    # The model type is read from the checkpoint (its image encoder's width).
    return SegmentAnythingBoxSegmenter.from_checkpoint(segment_anything_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def groundingdino_py_files(tmp_path_factory):
    """A small groundingdino-py config, the BERT it names, and a random checkpoint laid out like the released ones."""
    pytest.importorskip("groundingdino", reason=NEEDS_VISION_ENV)
    from tiny_grounding_models import tiny_bert_tokenizer

    from realign_pipeline.grounding.groundingdino_backend import build_groundingdino_py_model

    folder = tmp_path_factory.mktemp("groundingdino-py")
    text_encoder = folder / "bert"
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tiny_bert_tokenizer().get_vocab()),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).save_pretrained(text_encoder)
    tiny_bert_tokenizer().save_pretrained(text_encoder)
    config = folder / "GroundingDINO_tiny.py"
    config.write_text(textwrap.dedent(GROUNDINGDINO_CONFIG.format(text_encoder=text_encoder)))
    model = build_groundingdino_py_model(config, None)
    checkpoint = folder / "groundingdino_tiny.pth"
    torch.save({"model": {f"module.{key}": value for key, value in model.state_dict().items()}}, checkpoint)
    return config, checkpoint


@pytest.fixture(scope="module")
def groundingdino_py_detector(groundingdino_py_files):
    from realign_pipeline.grounding.groundingdino_backend import GroundingDinoPyBoxDetector

    config, checkpoint = groundingdino_py_files
    return GroundingDinoPyBoxDetector.from_checkpoint(
        config, checkpoint, device="cpu", box_threshold=0.0, text_threshold=0.0, image_size=96, max_image_size=128
    )


def test_segment_anything_without_boxes_does_not_embed_the_image(segment_anything_segmenter):
    encoder = ForwardCounter(segment_anything_segmenter.predictor.model.image_encoder)
    try:
        assert segment_anything_segmenter(coarse_image(), []) == []
    finally:
        encoder.remove()
    assert encoder.calls == 0


def test_segment_anything_checkpoint_for_another_model_type_is_refused(segment_anything_checkpoint):
    with pytest.raises(ValueError, match="`model_type` is 'vit_l' but .* holds a vit_b model"):
        SegmentAnythingBoxSegmenter.from_checkpoint(segment_anything_checkpoint, model_type="vit_l", device="cpu")
    same = SegmentAnythingBoxSegmenter.from_checkpoint(segment_anything_checkpoint, model_type="vit_b", device="cpu")
    assert same.predictor.model.image_encoder.patch_embed.proj.weight.shape[0] == 768


def test_groundingdino_py_boxes_follow_the_thresholds(groundingdino_py_detector):
    image = coarse_image()
    counter = ForwardCounter(groundingdino_py_detector.model)
    try:
        detections = groundingdino_py_detector(image, CAPTIONS)
    finally:
        counter.remove()
    assert counter.calls == 1
    assert len(detections) == len(CAPTIONS)
    for detection in detections:
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
    groundingdino_py_detector.box_threshold = 1.01
    try:
        assert groundingdino_py_detector(image, CAPTIONS) == [None] * len(CAPTIONS)
    finally:
        groundingdino_py_detector.box_threshold = 0.0


def test_groundingdino_py_checkpoint_that_does_not_match_is_refused(groundingdino_py_files, tmp_path):
    from realign_pipeline.grounding.groundingdino_backend import build_groundingdino_py_model

    config, checkpoint = groundingdino_py_files
    state = torch.load(checkpoint, weights_only=True)["model"]
    state.pop("module.feat_map.weight")
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": state}, truncated)
    with pytest.raises(ValueError, match="feat_map.weight"):
        build_groundingdino_py_model(config, truncated)


@pytest.mark.parametrize("detector_kind", ["groundingdino-py", "transformers"])
@pytest.mark.parametrize("segmenter_kind", ["segment-anything", "transformers"])
def test_every_detector_feeds_every_segmenter(
    detector_kind,
    segmenter_kind,
    groundingdino_py_detector,
    segment_anything_segmenter,
    tiny_grounding_dino_folder,
    tiny_sam_folder,
):
    if detector_kind == "groundingdino-py":
        detector = groundingdino_py_detector
    else:
        detector = GroundingDinoBoxDetector.from_pretrained(
            tiny_grounding_dino_folder, device="cpu", box_threshold=0.0, text_threshold=0.0
        )
    if segmenter_kind == "segment-anything":
        segmenter = segment_anything_segmenter
    else:
        segmenter = SamBoxSegmenter.from_pretrained(tiny_sam_folder, device="cpu")
    grounder = GroundedSamGrounder(detector, segmenter)
    assert grounder.name == f"{detector.name}+{segmenter.name}"
    image = coarse_image()
    # The image is embedded once and all boxes are decoded in one batched call (ViT-B at 1024 px is the
    # slowest step of these tests: it runs once per segment-anything case).
    sam_model = segmenter.predictor.model if segmenter_kind == "segment-anything" else segmenter.model
    encoder = ForwardCounter(sam_model.image_encoder if segmenter_kind == "segment-anything" else sam_model)
    decoder = ForwardCounter(sam_model.mask_decoder)
    try:
        masks = grounder(image, CAPTIONS)
    finally:
        encoder.remove()
        decoder.remove()
    assert (encoder.calls, decoder.calls) == (1, 1)
    assert len(masks) == len(CAPTIONS)
    for mask in masks:
        # Random SAM weights may cut an empty mask from a box: the grounder then reports nothing (None).
        assert mask is None or (mask.dtype == torch.bool and tuple(mask.shape) == (image.height, image.width))
    assert all(detection is not None for detection in detector(image, CAPTIONS))


def test_groundingdino_py_own_model_class_still_needs_transformers_4(groundingdino_py_files):
    """Why the backend assembles the model itself; when this fails, groundingdino-py builds on transformers 5."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    config, _ = groundingdino_py_files
    with pytest.raises(AttributeError, match="get_extended_attention_mask|get_head_mask"):
        build_model(SLConfig.fromfile(str(config)))
