"""The app's layout and its edits, without a model or a browser: exact masks, errors that name the field, and the
layout file's round trip."""

import dataclasses
import json

import numpy as np
import pytest

from realign_pipeline.app.session import (
    AppLayout,
    DraftSettings,
    EditableRegion,
    RealignSettings,
    add_region,
    box_mask,
    check_draft_settings,
    check_realign_settings,
    delete_region,
    layout_from_json,
    layout_to_json,
    painted_mask,
    regions_markdown,
    rename_region,
    resized_mask,
)


def mask_from_rows(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


@pytest.fixture
def layout() -> AppLayout:
    draft = DraftSettings("a red circle and a blue square", 3, 10, 4.0, 1.0)
    regions = (
        EditableRegion("a red circle", mask_from_rows("##..", "##..", "....", "...."), "shapes-palette"),
        EditableRegion("a blue square", mask_from_rows("....", "....", "..##", "..#."), "attention"),
    )
    return AppLayout(draft, height=4, width=4, regions=regions, realign=RealignSettings(0.5, 1.0, 0.3, 0.0))


def test_box_mask_is_true_inside_the_box_with_exclusive_ends():
    expected = mask_from_rows("....", ".##.", ".##.", "....", "....")
    assert np.array_equal(box_mask(5, 4, (1, 1, 3, 3)), expected)
    assert box_mask(5, 4, (0, 0, 4, 5)).all()


@pytest.mark.parametrize("box", [(2, 0, 2, 3), (0, 3, 2, 1), (0, 0, 5, 3), (0, 0, 2, 6)])
def test_a_box_outside_the_image_or_empty_is_refused(box):
    with pytest.raises(ValueError, match=r"0 <= x0 < x1 <= 4 and 0 <= y0 < y1 <= 5"):
        box_mask(5, 4, box)


def test_a_box_corner_that_is_not_a_non_negative_integer_is_named():
    with pytest.raises(ValueError, match="`y1` must be an integer >= 0, got 2.5"):
        box_mask(5, 4, (0, 0, 2, 2.5))
    with pytest.raises(ValueError, match="`x0` must be an integer >= 0, got -1"):
        box_mask(5, 4, (-1, 0, 2, 2))


def test_rename_changes_only_that_caption_and_keeps_mask_and_source(layout):
    renamed = rename_region(layout, 2, "  the blue square ")
    assert [r.caption for r in renamed.regions] == ["a red circle", "the blue square"]
    assert renamed.regions[1].mask is layout.regions[1].mask and renamed.regions[1].source == "attention"
    assert layout.regions[1].caption == "a blue square"  # the old layout is untouched: a failed edit keeps it


def test_rename_to_its_own_caption_is_allowed_but_not_to_another_regions(layout):
    assert [r.caption for r in rename_region(layout, 1, "a red circle").regions] == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="region 1 already has the caption 'a red circle'"):
        rename_region(layout, 2, "a red circle")


@pytest.mark.parametrize("index", [0, 3, None, 1.5])
def test_a_region_number_out_of_range_is_refused(layout, index):
    with pytest.raises(ValueError, match="`region`"):
        delete_region(layout, index)


def test_delete_removes_exactly_that_region(layout):
    assert [r.caption for r in delete_region(layout, 1).regions] == ["a blue square"]
    assert delete_region(delete_region(layout, 2), 1).regions == ()


def test_add_region_appends_a_copy_and_refuses_empty_or_wrong_size_masks(layout):
    mask = box_mask(4, 4, (0, 3, 1, 4))
    added = add_region(layout, "a circle", mask, "box")
    assert [r.source for r in added.regions] == ["shapes-palette", "attention", "box"]
    mask[:] = False
    assert added.regions[2].mask.sum() == 1  # the layout does not share the caller's array
    with pytest.raises(ValueError, match="`mask` is empty"):
        add_region(layout, "a circle", np.zeros((4, 4), dtype=bool), "box")
    with pytest.raises(ValueError, match=r"image's size \(4, 4\)"):
        add_region(layout, "a circle", np.ones((4, 5), dtype=bool), "box")
    with pytest.raises(ValueError, match="`caption` must be a non-empty text"):
        add_region(layout, "  ", box_mask(4, 4, (0, 0, 1, 1)), "box")


def test_painted_mask_is_any_layer_with_alpha_and_nothing_painted_is_refused():
    first = np.zeros((3, 3, 4), dtype=np.uint8)
    second = np.zeros((3, 3, 4), dtype=np.uint8)
    first[0, 0, 3] = 255
    second[2, 1, 3] = 1
    second[1, 1, :3] = 255  # colour without alpha is not paint
    assert np.array_equal(painted_mask([first, second]), mask_from_rows("#..", "...", ".#."))
    with pytest.raises(ValueError, match="nothing is drawn"):
        painted_mask([np.zeros((3, 3, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match="nothing is drawn"):
        painted_mask([])


def test_resized_mask_keeps_a_pixel_when_at_least_half_of_its_block_is_painted():
    painted = np.zeros((4, 4), dtype=bool)
    painted[0:2, 0:2] = True  # block (0, 0): all of it
    painted[0, 2:4] = True  # block (0, 1): half of it
    painted[2, 0] = True  # block (1, 0): a quarter
    assert np.array_equal(resized_mask(painted, 2, 2), mask_from_rows("##", ".."))


def test_the_layout_file_round_trips_every_field_and_mask(layout):
    text = layout_to_json(layout)
    record = json.loads(text)
    assert record["prompt"] == "a red circle and a blue square" and record["seed"] == 3
    assert record["realign"] == {
        "modulation_fraction": 0.5,
        "cross_attention_weight": 1.0,
        "self_attention_weight": 0.3,
        "area_weight": 0.0,
    }
    restored = layout_from_json(text)
    assert (restored.draft, restored.height, restored.width, restored.realign) == (
        layout.draft,
        layout.height,
        layout.width,
        layout.realign,
    )
    assert [(r.caption, r.source) for r in restored.regions] == [(r.caption, r.source) for r in layout.regions]
    for mine, theirs in zip(restored.regions, layout.regions):
        assert mine.mask.dtype == np.bool_ and np.array_equal(mine.mask, theirs.mask)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(format="other"), 'must be a JSON object with "format"'),
        (lambda r: r.update(version=2), "`version` must be 1"),
        (lambda r: r.pop("seed"), "lacks `seed`"),
        (lambda r: r.update(num_inference_steps=0), "`num_inference_steps` must be an integer >= 1"),
        (lambda r: r.update(coarse_stop_fraction=1.5), r"`coarse_stop_fraction` must be in \(0, 1\]"),
        (lambda r: r["realign"].update(area_weight=-1), "`area_weight` must be >= 0"),
        (lambda r: r["realign"].update(strength=2), r"unknown settings \['strength'\]"),
        (lambda r: r["regions"][1].update(mask_png="not base64!"), r"`regions\[1\].mask_png` must be a base64"),
        (lambda r: r.update(width=5), r"`regions\[0\].mask_png` is 4x4 pixels; the layout is 5x4"),
        (lambda r: r["regions"][1].update(caption="a red circle"), "region 1 already has the caption"),
    ],
)
def test_a_wrong_layout_file_names_what_is_wrong(layout, change, message):
    record = json.loads(layout_to_json(layout))
    change(record)
    with pytest.raises(ValueError, match=message):
        layout_from_json(json.dumps(record))


def test_a_file_that_is_not_json_is_refused():
    with pytest.raises(ValueError, match="the layout file is not JSON"):
        layout_from_json("{not json")


def test_draft_and_realign_settings_are_checked_by_name():
    assert check_draft_settings(" a red circle ", "7", 10.0, "4", 0.3) == DraftSettings(
        "a red circle", 7, 10, 4.0, 0.3
    )
    for arguments, message in [
        (("", 0, 10, 4, 1), "`prompt` must be a non-empty text"),
        (("p", -1, 10, 4, 1), "`seed` must be an integer >= 0"),
        (("p", 0, 2.5, 4, 1), "`num_inference_steps` must be an integer >= 1"),
        (("p", 0, 10, float("nan"), 1), "`guidance_scale` must be a finite number"),
        (("p", 0, 10, -1, 1), "`guidance_scale` must be >= 0"),
        (("p", 0, 10, 4, 0), r"`coarse_stop_fraction` must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_draft_settings(*arguments)
    assert check_realign_settings(0, 2, 0, 0) == RealignSettings(0.0, 2.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"`modulation_fraction` must be in \[0, 1\]"):
        check_realign_settings(1.1, 1, 0.3, 1)
    with pytest.raises(ValueError, match="`self_attention_weight` must be >= 0"):
        check_realign_settings(0.3, 1, -0.1, 1)


def test_the_region_table_lists_number_caption_source_and_area(layout):
    assert regions_markdown(layout).splitlines()[2:] == [
        "| 1 | a red circle | shapes-palette | 25.0% |",
        "| 2 | a blue square | attention | 18.8% |",
    ]
    assert (
        regions_markdown(rename_region(layout, 1, "a|b")).splitlines()[2] == "| 1 | a\\|b | shapes-palette | 25.0% |"
    )
    assert "No regions" in regions_markdown(dataclasses.replace(layout, regions=()))
    assert "press **Draft**" in regions_markdown(None)
