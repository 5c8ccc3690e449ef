"""grounding.factory.load_grounder: each grounder by name, its files checked before any model loads."""

import pytest
from tests.grounding.tiny_grounding_models import save_tiny_grounding_dino, save_tiny_sam

from realign_pipeline.grounding import GroundedSamGrounder
from realign_pipeline.grounding.factory import load_grounder


def test_the_attention_grounder_is_none_the_pipeline_reads_masks_off_attention():
    assert load_grounder("attention") is None


def test_an_unknown_grounder_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="`grounder` must be one of"):
        load_grounder("sam2")


def test_backends_check_their_files_before_loading(tmp_path):
    with pytest.raises(ValueError, match="`sam_checkpoint` is required"):
        load_grounder("segment-anything")
    with pytest.raises(ValueError, match="needs `groundingdino_config` and `groundingdino_checkpoint`"):
        load_grounder("groundingdino-py", groundingdino_config=tmp_path / "cfg.py")
    with pytest.raises(ValueError, match="`sam_checkpoint` must be an existing file"):
        load_grounder("segment-anything", sam_checkpoint=tmp_path / "missing.pth")


def test_grounding_sam_by_name_loads_both_models(tmp_path):
    detector = save_tiny_grounding_dino(tmp_path / "dino")
    segmenter = save_tiny_sam(tmp_path / "sam")
    grounder = load_grounder(
        "grounding-sam", detector=detector, segmenter=segmenter, device="cpu", box_threshold=0.0, text_threshold=0.0
    )
    assert isinstance(grounder, GroundedSamGrounder)
    assert grounder.name == "grounding-dino+sam"
