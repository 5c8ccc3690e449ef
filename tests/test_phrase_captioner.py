"""The rule-based captioner splits everyday prompts into noun phrases, leaving verbs and relations out.

Twenty-five prompts written for this test (not taken from any benchmark), with the phrases a person
would give, written by hand: actions (-ing, -s, -ed and irregular verbs), relations ("next to", "on
the left of", "left of"), plurals, possessives, "of" inside an object, bare nouns after verbs.
"""

import pytest

from realign_pipeline import PromptPhraseCaptioner

EVERYDAY_PROMPTS = [
    ("a black cat sitting on a red chair", ["a black cat", "a red chair"]),
    ("a boy kicking a ball", ["a boy", "a ball"]),
    ("a green triangle left of a blue circle", ["a green triangle", "a blue circle"]),
    ("two dogs playing in the park", ["two dogs", "the park"]),
    ("a woman reading a book next to a window", ["a woman", "a book", "a window"]),
    ("the girl's red umbrella and a yellow raincoat", ["the girl's red umbrella", "a yellow raincoat"]),
    ("a dog on the left of a cat", ["a dog", "a cat"]),
    ("three red apples in a wooden bowl", ["three red apples", "a wooden bowl"]),
    ("a man riding a horse on the beach", ["a man", "a horse", "the beach"]),
    ("a small bird perched on a branch", ["a small bird", "a branch"]),
    ("a chef cooks pasta in a kitchen", ["a chef", "pasta", "a kitchen"]),
    ("a red car parked next to a white house", ["a red car", "a white house"]),
    ("the cat sleeps under the table", ["the cat", "the table"]),
    ("a teddy bear on the right of a lamp", ["a teddy bear", "a lamp"]),
    ("children flying kites in a field", ["children", "kites", "a field"]),
    ("a brown horse and a white cow eating grass", ["a brown horse", "a white cow", "grass"]),
    ("my mother's blue car next to an office building", ["my mother's blue car", "an office building"]),
    ("a laptop beside a cup of coffee", ["a laptop", "a cup of coffee"]),
    ("an old man walks his dog", ["an old man", "his dog"]),
    ("a cat chasing a mouse across the kitchen floor", ["a cat", "a mouse", "the kitchen floor"]),
    ("a pair of shoes next to the door", ["a pair of shoes", "the door"]),
    ("a yellow bus stopped at a traffic light", ["a yellow bus", "a traffic light"]),
    ("a woman with long hair holds an umbrella", ["a woman", "long hair", "an umbrella"]),
    ("two girls holding hands under a tree", ["two girls", "hands", "a tree"]),
    ("a sleeping puppy lay beside five ducks swimming in a pond", ["a sleeping puppy", "five ducks", "a pond"]),
]


def test_everyday_prompts_split_into_noun_phrases():
    captioner = PromptPhraseCaptioner()
    wrong = [(prompt, captioner.phrases(prompt), expected) for prompt, expected in EVERYDAY_PROMPTS]
    wrong = [case for case in wrong if case[1] != case[2]]
    assert len(EVERYDAY_PROMPTS) == 25
    # The goal is at least 24 of 25; this set is all of them.
    assert not wrong, wrong


@pytest.mark.parametrize("prompt, expected", EVERYDAY_PROMPTS, ids=[p for p, _ in EVERYDAY_PROMPTS])
def test_each_everyday_prompt(prompt, expected):
    assert PromptPhraseCaptioner().phrases(prompt) == expected


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # Compound nouns that look like verb forms stay whole.
        ("a bus stop next to an office building", ["a bus stop", "an office building"]),
        ("a pentagonal parking sign and a flower bed", ["a pentagonal parking sign", "a flower bed"]),
        ("a sleeping cat and a striped sofa", ["a sleeping cat", "a striped sofa"]),
        # A bare verb stem is a verb after a plural subject only.
        ("two dogs play in the snow", ["two dogs", "the snow"]),
        # Adjectives after a verb name no object.
        ("the sunflower stood tall next to the grass", ["the sunflower", "the grass"]),
        (
            "The striped black and white cat lay next to the soft grey blanket.",
            ["The striped black and white cat", "the soft grey blanket"],
        ),
    ],
)
def test_rules_for_hard_cases(prompt, expected):
    assert PromptPhraseCaptioner().phrases(prompt) == expected
