import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from realign_pipeline.training import TrainConfig, average_ranks, rank_sum, select_best, train

TOY_REWARDS = Path(__file__).with_name("toy_rewards.py")


def test_ranks_are_zero_for_the_best_and_share_ties():
    assert average_ranks(torch.tensor([0.1, 0.9, 0.5])).tolist() == [2.0, 0.0, 1.0]
    assert average_ranks(torch.tensor([1.0, 1.0, 0.0])).tolist() == [0.5, 0.5, 2.0]
    assert average_ranks(torch.tensor([float("nan"), 0.0])).tolist() == [1.0, 0.0]


def test_selection_keeps_the_best_rank_sum_not_the_best_score_sum():
    # Sample 0 wins reward "a" by a mile but is last under "b" and "c": raw scores would keep it,
    # ranks keep sample 1, best or second under every reward.
    scores = {
        "a": torch.tensor([[100.0, 0.9, 0.5]]),
        "b": torch.tensor([[0.1, 0.8, 0.9]]),
        "c": torch.tensor([[0.0, 0.7, 0.1]]),
    }
    assert rank_sum(scores).tolist() == [[4.0, 2.0, 3.0]]
    assert select_best(scores).tolist() == [[1]]
    assert select_best(scores, keep=2).tolist() == [[1, 2]]
    # Weights scale each reward's ranks.
    assert select_best(scores, weights={"a": 10.0}).tolist() == [[0]]


def test_each_prompt_keeps_its_own_best():
    scores = {"a": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    assert select_best(scores).tolist() == [[1], [0]]


@pytest.mark.parametrize("prompt_count", [8, 6])
def test_rounds_are_evaluated_and_the_best_one_is_kept(
    toy_config, tmp_path, prompt_file, six_prompt_file, prompt_count
):
    validation = ["a red book", "a blue car"]
    (tmp_path / "validation.txt").write_text("\n".join(validation) + "\n")
    # Validation calls: before, round 1, round 2, after (the kept weights). Round 1 is best.
    script = [0.2, 0.9, 0.5, 0.9]
    config = TrainConfig(
        **toy_config(
            method="reward_ranked",
            prompts=str(prompt_file if prompt_count == 8 else six_prompt_file),
            rewards=[
                {"name": f"{TOY_REWARDS}:ScriptedValidation", "validation_prompts": validation, "script": script},
                {"name": f"{TOY_REWARDS}:Redness", "weight": 0.5},
            ],
            validation_prompts=str(tmp_path / "validation.txt"),
            ranked_samples_per_prompt=3,
            ranked_prompts_per_round=3,
            ranked_rounds=2,
            train_batch_size=2,
            checkpoints_total_limit=None,
            learning_rate=1e-2,
        )
    )
    result = train(config)
    output = Path(config.output_dir)
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["best_round"] == 1
    rounds = [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rounds] == [1, 2]
    # Each round trains on 3 kept samples in batches of 2 -> 2 steps; checkpoints at steps 2 and 4.
    after_round_1 = load_file(output / "checkpoints" / "checkpoint-2" / "unet_lora.safetensors")
    after_round_2 = load_file(output / "checkpoints" / "checkpoint-4" / "unet_lora.safetensors")
    final = load_file(output / "lora" / "pytorch_lora_weights.safetensors")
    assert result.finished and len(final) == len(after_round_1)

    def total(state):
        return sum(float(v.double().abs().sum()) for k, v in state.items() if "lora_B" in k or "lora.up" in k)

    assert total(final) == total(after_round_1) != total(after_round_2)
