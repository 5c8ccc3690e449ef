import pytest
import torch
from PIL import Image

from realign_pipeline.rewards import TAG_SCORE_SCHEMA, TagReward, tag_reward_value


class KeywordJudge:
    """Stands in for the LLM: 3 if the tag is a prompt word, 2 if listed as related, else 1."""

    def __init__(self, related=()):
        self.related = set(related)
        self.requests = []

    def complete_json(self, messages, schema):
        import json

        assert schema == TAG_SCORE_SCHEMA
        request = json.loads(messages[-1]["content"])
        self.requests.append(request)
        words = set(request["prompt"].split())
        return {
            "scores": [
                {"tag": tag, "score": 3 if tag in words else 2 if tag in self.related else 1}
                for tag in request["tags"]
            ]
        }


def test_tag_reward_formula():
    assert tag_reward_value([3, 3]) == 0.5
    assert tag_reward_value([2, 2, 2]) == 0.0
    assert tag_reward_value([1]) == -0.5
    assert tag_reward_value([3, 1]) == 0.0
    assert tag_reward_value([]) == -0.5


def test_tag_reward_scores_each_image_through_the_llm():
    tags = [["book", "red"], ["book", "shelf"], ["dog", "grass"], []]
    judge = KeywordJudge(related={"shelf"})
    reward = TagReward(lambda images: tags[: len(images)], judge)
    images = [Image.new("RGB", (8, 8))] * 4
    scores, info = reward(images, ["a red book"] * 4)
    assert torch.allclose(scores, torch.tensor([0.5, 0.25, -0.5, -0.5]))
    assert info["tag_scores"] == [[3, 3], [3, 2], [1, 1], []]
    assert len(judge.requests) == 3  # no request for an image without tags


def test_tags_the_llm_skips_or_garbles_count_as_unrelated():
    class SloppyJudge:
        def complete_json(self, messages, schema):
            return {"scores": [{"tag": "RED", "score": 7}, {"tag": "book"}, "nonsense"]}

    reward = TagReward(lambda images: [["red", "book", "cat"]], SloppyJudge())
    scores, info = reward([Image.new("RGB", (8, 8))], ["a red book"])
    assert info["tag_scores"] == [[3, 1, 1]]
    assert scores[0] == pytest.approx((5 - 6) / 6)


def test_tag_reward_through_the_llm_client_and_a_stub_server(tmp_path):
    import json

    from realign_pipeline.captioners import CaptionTagger
    from realign_pipeline.llm.client import JsonChatClient
    from tests.servers.openai_stub import STUB_API_KEY, OpenAIStub, chat_reply

    def judge(body):
        request = json.loads(body["messages"][-1]["content"])
        words = set(request["prompt"].split())
        return chat_reply({"scores": [{"tag": t, "score": 3 if t in words else 1} for t in request["tags"]]})

    captions = ["a red book on a wooden table", "a dog"]
    tagger = CaptionTagger(lambda images: captions[: len(images)])
    with OpenAIStub(responder=judge) as server:
        client = JsonChatClient(
            model="stub-model", base_url=server.url, api_key=STUB_API_KEY, max_retries=0, use_cache=False
        )
        reward = TagReward(tagger, client)
        scores, info = reward([Image.new("RGB", (8, 8))] * 2, ["a red book on a table", "a red book on a table"])
        assert len(server.requests) == 2
    for tags, tag_scores, score in zip(info["tags"], info["tag_scores"], scores):
        assert tags and len(tag_scores) == len(tags)
        assert score.item() == pytest.approx(tag_reward_value(tag_scores))
    assert "book" in info["tags"][0] and scores[0] > scores[1]
