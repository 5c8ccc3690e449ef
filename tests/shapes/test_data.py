"""The shapes world's data: deterministic, held-out pairings really held out, captions round-trip."""

import numpy as np
import pytest

from realign_pipeline import PromptPhraseCaptioner
from realign_pipeline.shapes import data
from realign_pipeline.shapes.data import (
    ALL_PAIRS,
    CATEGORIES,
    EVAL_CATEGORIES,
    EVAL_PROMPTS_PER_CATEGORY,
    HELD_OUT_PAIRS,
    TRAIN_PAIRS,
    caption_for,
    evaluation_prompts,
    evaluation_specs,
    finetune_prompts,
    make_sample,
    parse_prompt,
    relation_holds,
    scene_for_prompt,
)


def test_samples_are_pure_functions_of_seed_and_index():
    first, again, other = make_sample(0, 7), make_sample(0, 7), make_sample(1, 7)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert np.array_equal(first.masks, again.masks)
    assert first.scene == again.scene
    assert first.scene != other.scene
    assert first.image.size == (64, 64) and first.image.mode == "RGB"


def test_training_stream_never_contains_held_out_pairings():
    held_out_phrases = [f"{c} {s}" for c, s in HELD_OUT_PAIRS]
    categories = set()
    for index in range(1500):
        scene = make_sample(3, index).scene
        categories.add(scene.category)
        assert not HELD_OUT_PAIRS.intersection((o.colour, o.shape) for o in scene.objects)
        assert not any(phrase in scene.caption for phrase in held_out_phrases), scene.caption
    assert categories == set(data.CATEGORIES)
    assert set(TRAIN_PAIRS) | HELD_OUT_PAIRS == set(ALL_PAIRS) and not set(TRAIN_PAIRS) & HELD_OUT_PAIRS
    # every colour and every shape is still seen in training, only the pairings are new
    assert {c for c, _ in TRAIN_PAIRS} == set(data.COLOURS) and {s for _, s in TRAIN_PAIRS} == set(data.SHAPES)


@pytest.mark.parametrize("category", EVAL_CATEGORIES)
def test_evaluation_prompts_by_split(category):
    held_out = evaluation_specs(category, "held_out", n=40)
    seen = evaluation_specs(category, "seen", n=40)
    assert len(held_out) == len(seen) == 40
    assert all(spec.category == category for spec in held_out + seen)
    assert all(HELD_OUT_PAIRS.intersection(spec.pairs) for spec in held_out)
    assert not any(HELD_OUT_PAIRS.intersection(spec.pairs) for spec in seen)
    if category == "count":
        assert all(spec.pairs[0] in HELD_OUT_PAIRS and spec.groups[0].count > 1 for spec in held_out)
    assert evaluation_prompts(category, n=40) == [caption_for(spec) for spec in held_out]
    assert len(set(evaluation_prompts(category, n=40))) == 40


def test_captions_round_trip_and_match_the_phrase_captioner():
    phrase_captioner = PromptPhraseCaptioner()
    for index in range(300):
        scene = make_sample(4, index, "all").scene
        assert parse_prompt(scene.caption) == scene.spec
        assert caption_for(scene.spec) == scene.caption
        # the pipeline's rule-based captioner finds exactly the object phrases
        assert phrase_captioner.phrases(scene.caption) == [data.phrase_for(g) for g in scene.spec.groups]
        assert set(scene.caption.replace(",", " , ").split()) <= set(data.VOCABULARY)
    with pytest.raises(ValueError):
        parse_prompt("a photo of a cat")


def test_masks_layouts_and_relations_agree():
    for index in range(200):
        sample = make_sample(5, index, "all")
        scene, masks = sample.scene, sample.masks
        assert masks.shape == (len(scene.objects), 64, 64) and masks.dtype == bool
        assert (masks.sum(axis=(1, 2)) > 40).all()
        assert masks.sum(0).max() <= 1  # objects never overlap
        assert len(scene.objects) == scene.spec.num_objects
        pixels = np.asarray(sample.image)
        for obj, mask in zip(scene.objects, masks):
            assert np.abs(pixels[mask].mean(0) - data.PALETTE[obj.colour]).max() < 25
        if scene.spec.relation is not None:
            relation = scene.spec.relation
            centers = [np.argwhere(m)[:, ::-1].mean(0) for m in masks]
            assert relation_holds(centers[relation.subject], relation.predicate, centers[relation.object])


def test_scene_for_any_prompt_gives_true_masks():
    rng = np.random.default_rng(0)
    scene = scene_for_prompt("two red triangles and a blue circle", rng)
    assert [(o.colour, o.shape) for o in scene.objects] == [("red", "triangle")] * 2 + [("blue", "circle")]
    _, masks = data.render_scene(scene)
    assert masks.shape == (3, 64, 64)


def test_clip_tokenizer_spells_every_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from realign_pipeline.toy_pipeline import write_clip_tokenizer_files

    write_clip_tokenizer_files(tmp_path, data.VOCABULARY)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    caption = "a red circle, two green triangles and a white square on the left of a purple circle"
    assert len(tokenizer(caption)["input_ids"]) == len(caption.replace(",", " ,").split()) + 2


def test_finetune_prompts_never_contain_an_evaluation_prompt():
    prompts = finetune_prompts()
    evaluated = {
        prompt
        for category in EVAL_CATEGORIES
        for split in ("held_out", "seen")
        for prompt in evaluation_prompts(category, split, EVAL_PROMPTS_PER_CATEGORY, seed=0)
    }
    assert len(prompts) == len(set(prompts)) > 400
    assert not evaluated.intersection(prompts)
    development = {
        prompt
        for category in CATEGORIES
        for split in data.DEVELOPMENT_SPLITS
        for prompt in evaluation_prompts(category, split, 100)
    }
    assert not development.intersection(prompts)  # the development prompts validate fine-tuning: never trained on
    categories = {parse_prompt(prompt).category for prompt in prompts}
    assert categories == set(CATEGORIES)
    # Prompts may name held-out pairings (text only); the evaluation prompts stay unseen.
    assert any(HELD_OUT_PAIRS.intersection(parse_prompt(prompt).pairs) for prompt in prompts)
    assert finetune_prompts() == prompts


def evaluation_set() -> set[str]:
    return {
        prompt
        for category in EVAL_CATEGORIES
        for split in data.EVALUATION_SPLITS
        for prompt in evaluation_prompts(category, split, EVAL_PROMPTS_PER_CATEGORY, seed=0)
    }


@pytest.mark.parametrize("category", CATEGORIES)
def test_development_split_is_disjoint_from_the_evaluation_split(category):
    evaluated = evaluation_set()
    held_out = evaluation_specs(category, "development", n=100)
    seen = evaluation_specs(category, "development_seen", n=100)
    expected = {"single": (2, 12)}.get(category, (16, 16))  # a small category keeps 2 per split for fine-tuning
    assert (len(held_out), len(seen)) == expected
    assert all(spec.category == category for spec in held_out + seen)
    assert all(HELD_OUT_PAIRS.intersection(spec.pairs) for spec in held_out)
    assert not any(HELD_OUT_PAIRS.intersection(spec.pairs) for spec in seen)
    captions = [caption_for(spec) for spec in held_out + seen]
    assert len(set(captions)) == len(captions) and not evaluated.intersection(captions)
    # The set is fixed: another seed only reorders it, so no seed reaches an evaluation prompt.
    for seed in (1, 5):
        assert sorted(evaluation_prompts(category, "development", 100, seed)) == sorted(captions[: len(held_out)])


def test_development_prompts_mix_held_out_and_seen_pairings():
    prompts = data.development_prompts()
    assert len(prompts) == len(set(prompts)) == 12 * len(CATEGORIES)
    by_category = {category: [p for p in prompts if parse_prompt(p).category == category] for category in CATEGORIES}
    assert all(len(group) == 12 for group in by_category.values())
    naming_held_out = {
        c: sum(bool(HELD_OUT_PAIRS.intersection(parse_prompt(p).pairs)) for p in g) for c, g in by_category.items()
    }
    assert naming_held_out == {"single": 2, "binding": 6, "relation": 6, "count": 6}
    assert not evaluation_set().intersection(prompts)
    with pytest.raises(ValueError, match="n_per_category"):
        data.development_prompts(0)
    with pytest.raises(ValueError, match="'single'"):
        data.development_prompts(15)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="unknown split 'train'"):
        evaluation_specs("binding", "train")
