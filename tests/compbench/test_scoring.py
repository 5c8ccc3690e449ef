"""The scoring rules on cases whose answers are known: BLIP-VQA's product, the spatial rule, 3-in-1, plan."""

import math

import PIL.Image
import pytest

from realign_pipeline.compbench.phrases import RulePhraseParser
from realign_pipeline.compbench.plan import image_file_name, image_seed, plan_work, shard
from realign_pipeline.compbench.scorers import (
    BlipVqaScorer,
    attribute_binding_score,
    complex_subcategory,
    three_in_one_score,
)
from realign_pipeline.compbench.spatial import find_relation, position_score, spatial_score
from realign_pipeline.grounding.base import BoxDetection


class ScriptedVqa:
    """Answers each question with a fixed probability, and records what it was asked."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def __call__(self, images, questions):
        self.asked.append(list(questions))
        return [self.answers[question] for question in questions]


def test_blip_vqa_asks_one_question_per_noun_phrase_and_multiplies_the_yes_probabilities():
    vqa = ScriptedVqa({"a green bench?": 0.8, "a blue bowl?": 0.25})
    images = [PIL.Image.new("RGB", (8, 8))] * 2
    results = BlipVqaScorer(vqa, RulePhraseParser())(images, "a green bench and a blue bowl")
    assert vqa.asked == [["a green bench?", "a blue bowl?", "a green bench?", "a blue bowl?"]]
    assert [r["score"] for r in results] == [pytest.approx(0.2), pytest.approx(0.2)]
    assert results[0]["details"]["questions"] == {"a green bench?": 0.8, "a blue bowl?": 0.25}


def test_attribute_binding_score_is_one_without_questions_and_rejects_non_probabilities():
    assert attribute_binding_score([]) == 1.0
    assert attribute_binding_score([0.5, 0.5, 0.5]) == 0.125
    with pytest.raises(ValueError, match="yes probability"):
        attribute_binding_score([1.5])


LEFT, RIGHT = (0, 0, 100, 100), (300, 0, 400, 100)


@pytest.mark.parametrize(
    ("relation", "box1", "box2", "expected"),
    [
        ("on the left of", LEFT, RIGHT, 1.0),
        ("on the left of", RIGHT, LEFT, 0.0),
        ("on the right of", RIGHT, LEFT, 1.0),
        ("on the top of", (0, 0, 100, 100), (0, 300, 100, 400), 1.0),  # image y grows downwards
        ("on the bottom of", (0, 0, 100, 100), (0, 300, 100, 400), 0.0),
        ("on the left of", (0, 0, 100, 100), (0, 300, 100, 400), 0.0),  # vertical distance dominates
        ("on the left of", (0, 0, 100, 100), (50, 0, 150, 100), 0.1 / (1 / 3)),  # IoU 1/3 over the 0.1 threshold
        ("next to", (0, 0, 10, 10), (600, 600, 610, 610), 150 / 600),
        ("near", (0, 0, 10, 10), (100, 600, 110, 610), 1.0),  # within 150 px horizontally
        ("on top of", (0, 0, 100, 100), (0, 300, 100, 400), 0.0),  # the official script has no rule for it
    ],
)
def test_position_score_follows_the_official_rule(relation, box1, box2, expected):
    assert position_score(relation, box1, box2) == pytest.approx(expected)


def test_spatial_score_combines_confidences_and_position_with_the_half_floor():
    first, second = BoxDetection(LEFT, 0.9), BoxDetection(RIGHT, 0.7)
    assert spatial_score("on the left of", first, second) == pytest.approx(0.25 * 0.9 + 0.25 * 0.7 + 0.5)
    assert spatial_score("on the right of", first, second) == 0.0  # 0.4 < 0.5
    assert spatial_score("on the left of", first, None) == 0.0  # 0.225 < 0.5
    assert spatial_score("on the left of", None, None) == 0.0
    assert find_relation("a girl on the top of a frog") == "on the top of"
    assert find_relation("a cat next to the left of a dog") == "next to"  # the official search order


def test_three_in_one_averages_the_parts_of_the_prompts_subcategory():
    assert three_in_one_score("spatial", 0.4, 0.8, 0.0) == pytest.approx(0.6)
    assert three_in_one_score("action", 0.4, 0.0, 0.3) == pytest.approx(0.35)
    assert three_in_one_score("spatial+action", 0.3, 0.6, 0.9) == pytest.approx(0.6)
    assert complex_subcategory("The red hat was on top of the brown coat rack.") == "spatial"
    assert complex_subcategory("The black phone was resting on the brown charger.") == "action"
    assert complex_subcategory("The sleek black cat sat on top of the fluffy white pillow.") == "spatial+action"


def test_rule_parser_reads_the_objects_around_a_complex_preposition():
    parser = RulePhraseParser()
    assert parser.complex_objects("The fluffy cat is on the left of the soft pillow.") == ("cat", "pillow")
    assert parser.complex_objects("The black phone was resting on the brown charger.") is None
    assert parser.without_adjectives("The red hat was on top of the brown coat rack.") == (
        "The hat was on top of the coat rack ."
    )


def test_file_names_seeds_and_shards():
    assert image_file_name("a green bench and a blue bowl", 12) == "a green bench and a blue bowl_000012.png"
    with pytest.raises(ValueError, match="official image file name"):
        image_file_name("a_b", 0)
    items = plan_work(["base", "reweight-attention"], {"color": ["p0", "p1", "p2"]}, 2, seed=7)
    assert [item.file_names for item in items[:2]] == [
        ["p0_000000.png", "p0_000001.png"],
        ["p1_000002.png", "p1_000003.png"],
    ]
    assert items[0].seeds == items[3].seeds  # the same prompt starts from the same noise in every configuration
    assert items[0].seeds[0] == image_seed(7, "color", 0) != image_seed(7, "shape", 0)
    shards = [shard(items, rank, 4) for rank in range(4)]
    assert sorted(i.key for s in shards for i in s) == sorted(i.key for i in items)
    assert sum(len(s) for s in shards) == len(items) == 6
    assert math.isclose(len(shards[0]), 2)
