"""Errors of the re-weighting in fp16 and bf16 against DenseDiffusion's formula in float64 (issue [K] item 3).

For one SD-1.5-shaped layer (8 heads × 40 channels, 1024 queries, self- and cross-attention, three regions),
prints the max abs error against float64 of: plain SDPA in the half type (against plain attention in float64),
the fast and the reference re-weighting, and fast − reference. ``tests/test_half_precision.py`` asserts the
bounds (each ≤ 2× plain's error); this script prints the numbers the README quotes.

    python benchmarks/half_precision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realign_pipeline.pipeline_realign_diff import (  # noqa: E402
    reweighted_attention_fast,
    reweighted_attention_reference,
)
from test_half_precision import formula_in_float64, sd_like_inputs  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    print("| layer | dtype | plain SDPA | fast | reference | fast − reference |")
    print("|---|---|---|---|---|---|")
    for cross in (False, True):
        (query, key, value), kwargs = sd_like_inputs(cross, seed=int(cross))
        truth = formula_in_float64(query, key, value, **kwargs)
        zero = {**kwargs, "strength": torch.zeros_like(kwargs["strength"])}
        plain_truth = formula_in_float64(query, key, value, **zero)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            inputs = [tensor.to(dtype) for tensor in (query, key, value)]
            half = {**kwargs, **{k: kwargs[k].to(dtype) for k in ("strength", "query_regions", "key_regions")}}
            fast = reweighted_attention_fast(*inputs, **half).double()
            reference = reweighted_attention_reference(*inputs, **half).double()
            plain = F.scaled_dot_product_attention(*inputs, scale=kwargs["scale"]).double()
            errors = [
                (plain - plain_truth).abs().max(),
                (fast - truth).abs().max(),
                (reference - truth).abs().max(),
                (fast - reference).abs().max(),
            ]
            cells = " | ".join(f"{error.item():.2e}" for error in errors)
            print(f"| {'cross' if cross else 'self'} | {str(dtype).removeprefix('torch.')} | {cells} |")


if __name__ == "__main__":
    main()
