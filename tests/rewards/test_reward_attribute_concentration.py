import math

import pytest
import torch

from realign_pipeline.rewards import AttributeConcentrationReward, attribute_concentration_loss


def maps_with(token_maps, tokens=6):
    """(B, h, w, tokens) maps where token k at image b attends as token_maps[b][k] says."""
    batch, (height, width) = len(token_maps), next(iter(token_maps[0].values())).shape
    maps = torch.full((batch, height, width, tokens), 1e-6)
    for b, per_token in enumerate(token_maps):
        for token, plane in per_token.items():
            maps[b, :, :, token] = plane
    return {(height, width): maps}


def left_half(size=8):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:, : size // 2] = True
    return mask


def test_attention_inside_the_mask_scores_one_and_spread_attention_scores_the_covered_share():
    inside = left_half().float() / left_half().sum()
    uniform = torch.full((8, 8), 1 / 64)
    maps = maps_with([{2: inside}, {2: uniform}])
    # Masks at image resolution (64 px) while the maps are 8x8: they are resized inside.
    image_mask = left_half(64)
    reward = AttributeConcentrationReward()
    scores, info = reward(None, ["a red book"] * 2, attention_maps=maps, regions=[[([2], image_mask)]] * 2)
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[1] == pytest.approx(0.5, abs=1e-4)
    assert info["num_terms"] == [1, 1]


def test_layouts_are_read_like_regions_and_an_image_without_regions_is_nan():
    class Region:
        def __init__(self, tokens, mask):
            self.token_indices, self.mask = tokens, mask

    class Layout:
        def __init__(self, regions):
            self.regions = regions

    uniform = torch.full((8, 8), 1 / 64)
    maps = maps_with([{1: uniform}, {1: uniform}])
    layouts = [Layout([Region([1], left_half())]), Layout([])]
    scores, _ = AttributeConcentrationReward()(None, ["x", "y"], attention_maps=maps, layouts=layouts)
    assert scores[0] == pytest.approx(0.5, abs=1e-4)
    assert math.isnan(scores[1])


def test_loss_is_small_when_concentrated_and_pulls_attention_into_the_mask():
    mask = left_half()
    concentrated = maps_with([{3: mask.float() * 0.99}])
    spread = maps_with([{3: torch.full((8, 8), 0.5)}])
    regions = [[([3], mask)]]
    assert attribute_concentration_loss(concentrated, regions) < attribute_concentration_loss(spread, regions)

    logits = torch.zeros(8, 8, requires_grad=True)
    maps = {(8, 8): torch.sigmoid(logits)[None, :, :, None].expand(1, 8, 8, 4)}
    attribute_concentration_loss(maps, [[([3], mask)]]).backward()
    # Descending the loss raises attention inside the mask and lowers it outside.
    assert torch.all(logits.grad[mask] < 0) and torch.all(logits.grad[~mask] > 0)


def test_missing_context_is_an_error():
    with pytest.raises(KeyError, match="attention_maps"):
        AttributeConcentrationReward()(None, ["x"])
