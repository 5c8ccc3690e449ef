"""Load a pushed RealignDiff pipeline with only diffusers installed (no realign-pipeline package).

python examples/custom_pipeline.py --repo your-org/realign-sd15
"""

import argparse

import torch
from diffusers import DiffusionPipeline

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repo", required=True, help="a pipeline repo or folder holding pipeline.py")
parser.add_argument("--prompt", default="a green bench and a blue bowl")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
# trust_remote_code=True runs the repo's pipeline.py: read it first, it is one file.
pipe = DiffusionPipeline.from_pretrained(args.repo, custom_pipeline=args.repo, trust_remote_code=True, dtype=dtype)
pipe.to(device)
out = pipe(args.prompt)
out.images[0].save("final.png")
out.coarse_images[0].save("coarse.png")
for region in out.layouts[0].regions:
    print(region.caption, region.source, region.token_indices, int(region.mask.sum()), "pixels")
