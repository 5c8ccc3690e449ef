import pytest
import torch

from realign_pipeline.rewards import WeightedSum, build_rewards


class Constant:
    differentiable = True

    def __init__(self, value):
        self.value = value

    def __call__(self, images, prompts, **context):
        return torch.full((len(prompts),), float(self.value)), {"value": self.value}


def test_weighted_sum_adds_weighted_scores_and_keeps_each_part():
    reward = WeightedSum({"a": Constant(1.0), "b": Constant(-2.0)}, {"a": 2.0, "b": 0.5})
    scores, info = reward(None, ["x", "y"])
    assert torch.allclose(scores, torch.tensor([1.0, 1.0]))
    assert torch.equal(info["b"], torch.tensor([-2.0, -2.0]))
    assert info["a_info"] == {"value": 1.0}
    assert reward.differentiable


def test_differentiable_only_if_every_weighted_part_is():
    class Flat(Constant):
        differentiable = False

    assert not WeightedSum({"a": Constant(1), "b": Flat(1)}).differentiable
    assert WeightedSum({"a": Constant(1), "b": Flat(1)}, {"b": 0.0}).differentiable


def test_unknown_weight_names_are_an_error():
    with pytest.raises(KeyError):
        WeightedSum({"a": Constant(1)}, {"typo": 1.0})


def test_build_rewards_from_config_specs(tmp_path, toy_blip_folder):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "import torch\n"
        "class Half:\n"
        "    differentiable = True\n"
        "    def __init__(self, scale=1.0):\n"
        "        self.scale = scale\n"
        "    def __call__(self, images, prompts, **context):\n"
        "        return torch.full((len(prompts),), 0.5 * self.scale), {}\n"
    )
    reward = build_rewards(
        [
            {"name": "concept_matching", "model": str(toy_blip_folder), "weight": 0.1},
            {"name": f"{module}:Half", "scale": 2.0, "weight": 3.0},
        ]
    )
    assert set(reward.rewards) == {"concept_matching", "Half"}
    scores, info = reward(torch.zeros(1, 3, 32, 32), ["a red book"])
    assert scores[0].item() == pytest.approx(0.1 * info["concept_matching"][0].item() + 3.0, abs=1e-5)
    assert reward.differentiable
