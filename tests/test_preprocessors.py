import pytest

from realign_pipeline import PromptPhraseCaptioner
from realign_pipeline.captioners import LLMDenseCaptioner
from realign_pipeline.grounding import GroundedSamGrounder
from realign_pipeline.preprocessors import load_captioner, load_grounder
from tests.grounding.tiny_grounding_models import save_tiny_grounding_dino, save_tiny_sam
from tests.servers.openai_stub import STUB_API_KEY, OpenAIStub, chat_reply


def test_rule_captioner_and_attention_grounder_need_no_model():
    assert isinstance(load_captioner("rule"), PromptPhraseCaptioner)
    assert load_grounder("attention") is None


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"`captioner` must be one of \('rule', 'openai'\)"):
        load_captioner("gpt")
    with pytest.raises(ValueError, match="`grounder` must be one of"):
        load_grounder("sam2")


def test_backends_check_their_files_before_loading(tmp_path):
    with pytest.raises(ValueError, match="`sam_checkpoint` is required"):
        load_grounder("segment-anything")
    with pytest.raises(ValueError, match="needs `groundingdino_config` and `groundingdino_checkpoint`"):
        load_grounder("groundingdino-py", groundingdino_config=tmp_path / "cfg.py")
    with pytest.raises(ValueError, match="`sam_checkpoint` must be an existing file"):
        load_grounder("segment-anything", sam_checkpoint=tmp_path / "missing.pth")


def test_openai_captioner_by_name_talks_to_the_server(tmp_path):
    with OpenAIStub(api_key=STUB_API_KEY) as server:
        server.push(chat_reply({"objects": [{"caption": "a red book", "box": None}]}))
        captioner = load_captioner(
            "openai", base_url=server.url, api_key=STUB_API_KEY, model="stub", cache_dir=tmp_path
        )
        assert isinstance(captioner, LLMDenseCaptioner)
        captions = captioner(None, "a red book and a yellow vase")
        assert [c.text for c in captions] == ["a red book"]
        assert len(server.requests) == 1


def test_grounding_sam_by_name_loads_both_models(tmp_path):
    detector = save_tiny_grounding_dino(tmp_path / "dino")
    segmenter = save_tiny_sam(tmp_path / "sam")
    grounder = load_grounder(
        "grounding-sam", detector=detector, segmenter=segmenter, device="cpu", box_threshold=0.0, text_threshold=0.0
    )
    assert isinstance(grounder, GroundedSamGrounder)
    assert grounder.name == "grounding-dino+sam"
