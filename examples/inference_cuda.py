"""RealignDiff on Stable Diffusion 1.5, fp16 on CUDA, with a caption-reward fine-tuned UNet.

python examples/inference_cuda.py --realign-unet your-org/realign-unet --prompt "a red book and a yellow vase"
"""

import argparse

import torch

from realign_pipeline import RealignDiffPipeline
from realign_pipeline.visualize import save_layout_panels

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--base", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--realign-unet", default=None, help="repo id or folder of the fine-tuned UNet (unet/ inside)")
parser.add_argument("--prompt", default="a red book and a yellow vase")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default="realign.png")
args = parser.parse_args()

pipe = RealignDiffPipeline.from_pretrained(args.base, realign_unet=args.realign_unet, dtype=torch.float16).to("cuda")
out = pipe(args.prompt, generator=torch.Generator("cuda").manual_seed(args.seed), coarse_stop_fraction=1.0)
save_layout_panels(out.images, out.layouts, args.output, coarse_images=out.coarse_images)
print(f"wrote {args.output}: coarse image, one tile per mask, final image")
