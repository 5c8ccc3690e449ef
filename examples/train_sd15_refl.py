"""Fine-tune Stable Diffusion 1.5 for text-image alignment with ReFL on one GPU.

ReFL's published settings (ImageReward, arXiv 2304.05977, on SD 1.4), which RealignDiff's coarse stage
follows since its own are unpublished: 40 DDPM steps, the gradient taken at one step drawn from the
last ten (indices [30, 40) of 40), reward loss weight λ = 1e-3 plus the denoising (pretraining) loss,
learning rate 1e-5, a batch of 64 and fp16. ImageReward spread the batch of 64 over 8 GPUs; here one GPU
reaches it with 4 prompts per step and 16 accumulation steps. The reward is CoMat's concept matching
(BLIP's log-likelihood of the prompt), the differentiable caption reward. Full fine-tuning holds the
weights, gradients and AdamW state of 860 M parameters in fp32 (about 14 GB) before activations;
--lora trains a rank-4 adapter instead (a few MB of state).

    pip install "realign-pipeline[train]"
    python examples/train_sd15_refl.py --prompts prompts.txt --output-dir outputs/refl-sd15
    realign push outputs/refl-sd15 --repo-id <you>/realign-sd15

Written for diffusers 0.42 (``dtype=`` in ``from_pretrained``).
"""

import argparse

from realign_pipeline.training import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompts", required=True, help="text file, one prompt per line (T2I-CompBench's *_train.txt)")
parser.add_argument("--output-dir", default="outputs/refl-sd15")
parser.add_argument("--base-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--captioner", default="Salesforce/blip-image-captioning-base", help="BLIP model of the reward")
parser.add_argument(
    "--pretrain-data",
    default="generate",
    help="(image, caption) pairs for the denoising regulariser: a folder with metadata.jsonl, hf:<dataset>, "
    "or 'generate' (images of the base model for the training prompts)",
)
parser.add_argument("--max-train-steps", type=int, default=1000)
parser.add_argument("--lora", action="store_true", help="train a rank-4 LoRA instead of the full UNet")
args = parser.parse_args()

config = TrainConfig(
    pretrained_model=args.base_model,
    method="refl",
    prompts=args.prompts,
    output_dir=args.output_dir,
    rewards=[{"name": "concept_matching", "model": args.captioner, "weight": 1.0}],
    resolution=512,
    # ReFL (ImageReward): 40 DDPM steps, gradient at a random step in the last 10.
    sampler="ddpm",
    num_inference_steps=40,
    refl_step_range=[30, 40],
    guidance_scale=7.5,
    # Loss: λ·relu(α − r) + denoising loss. Concept matching's scores are log-probabilities (≤ 0),
    # so α = 0 keeps every sample in the reward term.
    reward_loss_weight=1e-3,
    reward_threshold=0.0,
    pretrain_loss_weight=1.0,
    pretrain_data=args.pretrain_data,
    pretrain_generate_count=256,
    # Optimisation: lr 1e-5, batch 64 = 4 × 16 accumulation steps, fp16.
    learning_rate=1e-5,
    train_batch_size=4,
    gradient_accumulation_steps=16,
    max_train_steps=args.max_train_steps,
    mixed_precision="fp16",
    gradient_checkpointing=True,
    use_lora=args.lora,
    lora_rank=4,
    use_ema=False,
    # Bookkeeping: a checkpoint every 50 steps (run the same command again to resume), validation
    # grids every 100.
    checkpointing_steps=50,
    checkpoints_total_limit=2,
    validation_steps=100,
    num_validation_prompts=8,
    report_to="tensorboard",
)
result = train(config)
if result.finished:
    print(f"Done: {result.output_dir}/unet is the fine-tuned UNet. Publish it with")
    print(f"  realign push {result.output_dir} --repo-id <you>/realign-sd15")
else:
    print(f"Stopped at step {result.global_step}; run the same command to resume.")
