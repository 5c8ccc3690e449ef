"""Give the layout yourself (skips the coarse pass): one mask per object, any size, PIL/numpy/torch.

python examples/user_regions.py --model stable-diffusion-v1-5/stable-diffusion-v1-5
"""

import argparse

import numpy as np
import torch

from realign_pipeline import RealignDiffPipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = RealignDiffPipeline.from_pretrained(args.model, dtype=torch.float16 if device == "cuda" else torch.float32)
pipe.to(device)
left = np.zeros((64, 64), dtype=np.float32)
left[:, :32] = 1.0
out = pipe(
    "a red book and a yellow vase",
    regions=[("a red book", left), ("a yellow vase", 1.0 - left)],
    generator=torch.Generator(device).manual_seed(0),
)
out.images[0].save("regions.png")
